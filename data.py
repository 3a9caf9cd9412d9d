"""The datasets of ARC runs: the 19 VTAB-1k tasks, DTD, the five FGVC sets, any image folder, and a
synthetic set for quick checks.

    task = build("dtd", data_dir="./data", img_size=224, workers=4, log=print)
    task.train, task.test           # datasets of (uint8 image (3, H, W), int label)
    task.classes, task.description  # class names (label i is classes[i]); one line for the log
    for images, labels in Loader(task.train, device)(index_batches, seed):
        logits = model(normalize(images))  # uint8 (B, 3, H, W) batches on the device

Every image is decoded and resized once, when the task is built, by `workers` threads (PIL releases
the GIL while it decodes and resizes, so threads run in parallel without any worker process). A
Loader gathers batches where the split lives, on the device when it fits there, and normalize()
turns them into floats on the device, so loading never starves a GPU.

The recipes follow the official scripts. VTAB-1k, DTD and image folders are resized to (S, S) with
PIL's bicubic resize. FGVC sets, as in VPT and ARC, have their shorter side resized to S * 256/224
(bilinear); the test images are then centre-cropped to S once, and the training images get a random
S crop and a horizontal flip per epoch, drawn from the epoch's seed (Resized.crops) and gathered
for each batch.

Each name is read from the first of these places under data_dir that holds it:

- A VTAB-1k task: vtab-1k/<task>/ (NOAH, SSF), then <task>/ (RepAdapter, the official ARC scripts),
  then, for cifar, V-PETL Bench's vtab-1k/cifar100/ and cifar100/. The task folder holds
  train800val200.txt (the training split) and test.txt, with lines '<image path relative to the
  task folder> <label>'.
- dtd: those VTAB-1k lists when a place holds them (the paper's images). Otherwise torchvision's
  release in dtd/dtd/{images,labels}, downloaded when absent, split on the VTAB-1k protocol.
- cub, nabirds, flowers, dogs, cars: fgvc/<set>/, then <set>/, under each name the repositories
  use (FGVC_TASKS). The set folder holds VPT's train.json and test.json, which map an image path to
  a class id (remapped to 0..C-1 in sorted order); the paths are relative to the set's image folder
  (images/, or Images/ for Dogs) where there is one, and to the set folder otherwise. VPT and ARC
  leave val.json out, since it is a part of the training set.
- synthetic: 10 classes of coloured, oriented gratings with noise, generated at img_size.
- A path (a name with a path separator, or an existing folder): train/ and test/ (or val/) with a
  folder of images per class, as torchvision's ImageFolder reads them.

Odd files get a correct result or one clear line: images of any mode become 8-bit RGB (16-bit greys
scaled, not clipped); an image that is missing, unreadable, not a regular file (a named pipe) or
damaged is named with what is wrong; an unreadable folder or list file is an error, not an empty
one; links to folders are followed, but each real folder is walked once.
"""

import functools
import hashlib
import json
import math
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

# ImageNet's mean and standard deviation; normalize() applies them on the device.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

VTAB_TASKS = {  # task folder -> number of classes
    "caltech101": 102,
    "cifar": 100,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "patch_camelyon": 2,
    "sun397": 397,
    "svhn": 10,
    "resisc45": 45,
    "eurosat": 10,
    "dmlab": 6,
    "kitti": 4,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "clevr_dist": 6,
    "clevr_count": 8,
    "diabetic_retinopathy": 5,
}
VTAB_ALIASES = {"cifar": ["cifar100"]}  # V-PETL Bench's folder names
FGVC_TASKS = {  # name -> (its folder's names in VPT, ARC and V-PETL Bench, image folder, classes)
    "cub": (("CUB_200_2011", "CUB"), "images", 200),
    "nabirds": (("NABirds", "nabirds"), "images", 555),
    "flowers": (("OxfordFlowers", "OxfordFlower"), "", 102),
    "dogs": (("StanfordDogs",), "Images", 120),
    "cars": (("StanfordCars",), "", 196),
}
VTAB_GROUPS = {  # the paper's Table 1, in its order
    "natural": (
        "cifar",
        "caltech101",
        "dtd",
        "oxford_flowers102",
        "oxford_iiit_pet",
        "svhn",
        "sun397",
    ),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
SUITES = {
    "vtab-1k": [task for tasks in VTAB_GROUPS.values() for task in tasks],
    "fgvc": list(FGVC_TASKS),
}
LISTS = {  # kind -> its list files, training split first
    "vtab": ("train800val200.txt", "test.txt"),
    "fgvc": ("train.json", "test.json"),
}
SOURCES = {  # kind -> what build() reads, for the log
    "vtab": "VTAB-1k lists train800val200.txt and test.txt in",
    "fgvc": "VPT's train.json and test.json in",
    "dtd release": "DTD's release on the VTAB-1k protocol (the first 800 images of train1 and 200 "
    "of val1 in TFDS order; test1) in",
    "folder": "image folder",
}
LAYOUTS = {  # kind -> what its files should be, for the message when one is missing
    "vtab": "expected the VTAB-1k layout of NOAH, RepAdapter and SSF: <task>/train800val200.txt "
    "and <task>/test.txt, lines '<image path relative to the task folder> <label>' (NOAH's "
    "get_vtab1k.py makes them)",
    "fgvc": "expected VPT's split files train.json and test.json (cornell.box.com/v/vptfgvcsplits) "
    "in the set's folder, beside its images",
    "dtd release": "dtd/dtd is not a complete DTD release (images/<class>/*.jpg and "
    "labels/{train,val,test}1.txt): delete it to download it again",
    "folder": "--data needs train/ and test/ (or val/) subfolders with a folder of images per "
    "class, as torchvision's ImageFolder: train/<class>/xxx.jpg",
}
SYNTHETIC_CLASSES = 10
SYNTHETIC_TRAIN = 50  # images per class
SYNTHETIC_TEST = 20
# The cores this process may use, which can be fewer than the machine's.
if hasattr(os, "sched_getaffinity"):
    CORES = len(os.sched_getaffinity(0))
else:
    CORES = os.cpu_count() or 1


class DataError(Exception):
    """A dataset that is missing or broken; the message says what, where, and how to fix it."""


class Task(NamedTuple):
    """A dataset ready to train on: its two splits, its class names and a line for the log."""

    train: Dataset
    test: Dataset
    classes: list  # label i is classes[i]; the label itself where a list file gives no names
    description: str  # what was loaded from where, and how many images

    @property
    def num_classes(self):
        return len(self.classes)


class Preloaded(Dataset):
    """A whole split decoded once: images uint8 (N, 3, H, W) and labels int64 (N,)."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = labels
        self.nbytes = images.numel()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def to(self, device):
        return Preloaded(self.images.to(device), self.labels.to(device))


class Resized(Dataset):
    """A training split resized once and cropped for each batch.

    The images differ in size, so their (3, h, w) uint8 pixels lie one after another in one flat
    tensor, `pixels`; image i starts at offsets[i] and has the (h, w) of shapes[i] (int64 (N, 2)).
    A batch of crops is then one gather. Labels are int64 (N,), `size` is the side of the crops,
    and item i is image i, uncropped.
    """

    def __init__(self, pixels, shapes, labels, size):
        self.pixels = pixels
        self.shapes = shapes
        self.labels = labels
        self.size = size
        self.nbytes = pixels.numel()
        areas = 3 * shapes[:, 0] * shapes[:, 1]
        self.offsets = areas.cumsum(0) - areas

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        height, width = self.shapes[index].tolist()
        start = int(self.offsets[index])
        image = self.pixels[start : start + 3 * height * width].view(3, height, width)
        return image, int(self.labels[index])

    def to(self, device):
        return Resized(
            self.pixels.to(device), self.shapes.to(device), self.labels.to(device), self.size
        )

    def crops(self, epoch_seed):
        """The (tops, lefts, flips) of every image in the epoch of `epoch_seed`, on the split's
        device, drawn as RandomCrop and RandomHorizontalFlip draw them.

        They come from a private generator, so image i gets the same crop whoever draws it and
        whenever (a resumed run sees the crops of an uninterrupted one), and the global generators,
        which dropout uses, are left untouched.
        """
        generator = torch.Generator().manual_seed(epoch_seed)
        draws = torch.rand(len(self), 3, generator=generator, dtype=torch.float64)
        room = self.shapes.cpu() - self.size + 1
        tops, lefts = (draws[:, :2] * room).long().unbind(1)
        flips = draws[:, 2] < 0.5
        return tuple(t.to(self.pixels.device) for t in (tops, lefts, flips))

    def batch(self, index, crops):
        """Images `index` cropped and flipped as `crops` says: uint8 (B, 3, size, size).

        Row y of channel c of a crop is the `size` pixels from offset + c*h*w + (top + y)*w + left;
        all rows are gathered at once from pixels.unfold's view, which copies nothing.
        """
        tops, lefts, flips = (t[index] for t in crops)
        heights, widths = self.shapes[index, :, None, None].unbind(1)
        steps = torch.arange(self.size, device=index.device)
        channels = torch.arange(3, device=index.device)[:, None]
        planes = self.offsets[index, None, None] + channels * heights * widths  # (B, 3, 1)
        starts = planes + (tops[:, None, None] + steps) * widths + lefts[:, None, None]  # (B, 3, S)
        rows = self.pixels.unfold(0, self.size, 1).index_select(0, starts.flatten())
        rows = rows.view(*starts.shape, self.size)  # (B, 3, S, S)
        return torch.where(flips[:, None, None, None], rows.flip(-1), rows)


def fits_on_device(nbytes, device):
    """Whether a split of `nbytes` may live on `device` whole.

    On a GPU it may take at most half of the free memory (the driver's, and what torch caches
    unused); the rest is for the model, its activations and the other split.
    """
    if device.type != "cuda":
        return True
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return nbytes <= (torch.cuda.mem_get_info(device)[0] + cached) // 2


class Loader:
    """Batches of a split as uint8 images and labels on `device`.

    Called with a list of index tensors (and, for a Resized split, the epoch's seed, which decides
    its crops), it yields one batch per tensor, each gathered where the split lives: on the device
    when it fits there, else in host memory, which sends the batch alone, pinned so that the copy
    overlaps the GPU's work.
    """

    def __init__(self, split, device):
        self.device = device
        if not fits_on_device(split.nbytes, device):
            device = torch.device("cpu")
        self.split = split.to(device)

    def __len__(self):
        return len(self.split)

    def __call__(self, index_batches, seed=0):
        if not index_batches:  # under torchrun, a small test set can leave a process nothing
            return
        home = self.split.labels.device
        crops = self.split.crops(seed) if isinstance(self.split, Resized) else None  # once an epoch
        order = torch.cat(index_batches).to(home)  # one copy for the epoch, then slices of it
        for index in order.split([len(batch) for batch in index_batches]):
            images = self.split.images[index] if crops is None else self.split.batch(index, crops)
            labels = self.split.labels[index]
            if home.type != self.device.type:
                images, labels = (
                    t.pin_memory().to(self.device, non_blocking=True) for t in (images, labels)
                )
            yield images, labels


@functools.cache
def _mean_std(device):
    # Made once per device: a tensor built from a list at every step would be a blocking copy.
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))


def normalize(images):
    """uint8 images (B, 3, H, W) as float32, normalised with ImageNet's MEAN and STD."""
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


def build(name, data_dir="./data", img_size=224, workers=4, log=print):
    """The Task called `name` (see the module's docstring), or a DataError.

    `workers` threads decode the images. `log` gets a line saying where the data was found and one
    per decoded split; None keeps it quiet.
    """
    kind, places, found = _find(name, data_dir)
    if kind == "synthetic":
        return _synthetic(img_size)
    check(name, data_dir)
    folder = (found or places)[0]
    readers = {"vtab": _vtab, "fgvc": _fgvc, "dtd release": _dtd, "folder": _folder}
    train, test, classes = readers[kind](name, folder)
    if log is not None and found:
        others = "".join(f"; also found in {place}, not read" for place in found[1:])
        log(f"{name}: reading {folder}{others}")
    decode = functools.partial(_decode, size=img_size, workers=workers, log=log)
    if kind == "fgvc":
        train_split = decode(train, "train", "fgvc")
        test_split = decode(test, "test", "fgvc centre")
        recipe = f"random {img_size} crops + flips for training, centre crops for testing"
    else:
        train_split = decode(train, "train", "vtab")
        test_split = decode(test, "test", "vtab")
        recipe = f"resized to {img_size}x{img_size}"
    description = (
        f"{SOURCES[kind]} {folder}: {len(train)} train / {len(test)} test images, "
        f"{len(classes)} classes, {recipe}"
    )
    return Task(train_split, test_split, classes, description)


def missing(name, data_dir="./data"):
    """The first file or folder that `name` is read from and that is not there.

    None when all are there, or when DTD's release can be downloaded. Cheap: nothing is read.
    """
    kind, places, found = _find(name, data_dir)
    required = _required(kind, (found or places)[0])
    return next((path for path in required if not os.path.exists(path)), None)


def check(name, data_dir="./data"):
    """Raise a DataError naming what is missing (see missing()) and the layout expected."""
    absent = missing(name, data_dir)
    if absent is None:
        return
    kind, places, found = _find(name, data_dir)
    where = f"{absent} is missing"
    if kind in LISTS and not found:
        where = f"none of {', '.join(places)} holds {LISTS[kind][0]}"
    raise DataError(f"no {name} data: {where}; {LAYOUTS[kind]}")


def is_path(name):
    """Whether --data names a folder rather than a dataset.

    A dataset's name is taken as a folder only when it is written as a path (./cifar).
    """
    if os.sep in name or "/" in name:
        return True
    return os.path.isdir(name) and name not in ("synthetic", *VTAB_TASKS, *FGVC_TASKS)


def _find(name, data_dir):
    """(kind, places, found) of the dataset called `name`.

    `places` are the folders that may hold it, in the order they are tried, and `found` those that
    do (their training list is there); the first found is read. DTD falls back to torchvision's
    release in data_dir when no place holds its VTAB-1k lists.
    """
    if name == "synthetic":
        return "synthetic", [data_dir], []
    if name not in VTAB_TASKS and name not in FGVC_TASKS:
        if is_path(name):
            return "folder", [name], []
        raise DataError(
            f"unknown dataset {name!r}: choose synthetic, a VTAB-1k task "
            f"({', '.join(VTAB_TASKS)}), an FGVC set ({', '.join(FGVC_TASKS)}), a suite "
            f"({', '.join(SUITES)}), or a path to a folder with train/ and test/ class subfolders"
        )
    if name in VTAB_TASKS:
        kind = "vtab"
        folders = [name, *VTAB_ALIASES.get(name, [])]
        places = [os.path.join(data_dir, top, f) for f in folders for top in ("vtab-1k", "")]
    else:
        kind = "fgvc"
        folders = FGVC_TASKS[name][0]
        places = [os.path.join(data_dir, top, f) for top in ("fgvc", "") for f in folders]
    found = [place for place in places if os.path.isfile(os.path.join(place, LISTS[kind][0]))]
    if name == "dtd" and not found:
        return "dtd release", [data_dir], []
    return kind, places, found


def _required(kind, folder):
    """The files or folders a dataset of `kind` in `folder` is read from."""
    if kind in LISTS:
        return [os.path.join(folder, file) for file in LISTS[kind]]
    if kind == "folder":
        test = os.path.join(folder, "test")
        val = os.path.join(folder, "val")
        if os.path.isdir(val) and not os.path.isdir(test):
            test = val  # val/ stands for test/ where there is no test/
        return [os.path.join(folder, "train"), test]
    labels = os.path.join(folder, "dtd", "dtd", "labels")
    if kind == "dtd release" and os.path.isdir(os.path.dirname(labels)):
        # Downloaded when its folder is absent; a folder that is there must be complete.
        return [os.path.join(labels, f"{split}1.txt") for split in ("train", "val", "test")]
    return []  # synthetic: generated, or DTD: to be downloaded


def _reason(error):
    """An exception in one line: its type and message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _read_text(path):
    """The text of a list file, read as UTF-8 whatever the locale."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}): is it the list file, and complete?"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({_reason(e)})") from None


def _problem(path):
    """Why image `path` cannot be opened, in words; None when it is a readable regular file."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({_reason(e)})"
    if not stat.S_ISREG(mode):
        return "is not a regular file"  # a pipe would block the decoding forever
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    return None


def _check_samples(samples, source, num_classes):
    """Fail early on an empty split, a label out of range, or an image that cannot be opened."""
    if not samples:
        raise DataError(f"{source} lists no images")
    for path, label in samples:
        if not 0 <= label < num_classes:
            raise DataError(
                f"{source}: label {label} is outside 0..{num_classes - 1} (is it the right file?)"
            )
        problem = _problem(path)
        if problem:
            raise DataError(f"image {path} listed in {source} {problem}")


def _vtab(name, folder):
    """The samples of a VTAB-1k task's two lists, whose lines are '<image path> <label>'."""
    splits = []
    for path in _required("vtab", folder):
        samples = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                relative, label = line.strip().rsplit(maxsplit=1)
                samples.append((os.path.join(folder, relative), int(label)))
            except ValueError:
                raise DataError(
                    f"{path}, line {number}: expected '<image path> <label>', got {line!r}"
                ) from None
        _check_samples(samples, path, VTAB_TASKS[name])
        splits.append(samples)
    train, test = splits
    classes = [str(label) for label in range(VTAB_TASKS[name])]
    return train, test, classes


def _tfds_order(names, split):
    """Image names in the order TFDS stores them: by md5(split name + file name)."""
    return sorted(names, key=lambda name: hashlib.md5((split + name).encode()).digest())


def _dtd(_, data_dir):
    """DTD's release on the VTAB-1k protocol, downloaded by torchvision when its folder is absent.

    VTAB-1k trains on the first 800 images of train1 and the first 200 of val1 in TFDS's order (its
    'train[:800]' and 'validation[:200]'; the release's lists group the images by class), and
    tests on all of test1, in TFDS's order too.
    """
    root = os.path.join(data_dir, "dtd", "dtd")
    url = torchvision.datasets.DTD._URL
    try:
        if not os.path.isdir(root):  # the same test torchvision makes before downloading
            torchvision.datasets.DTD(data_dir, download=True)
    except Exception as e:  # no network, a proxy's error page, a broken archive: no data either way
        raise DataError(
            f"DTD not found in {root}/images and downloading {url} failed ({_reason(e)}). "
            f"Offline: put that file at {os.path.dirname(root)}/{os.path.basename(url)} (checked "
            f"and extracted on the next run), or extract it: {root}/images/<class>/*.jpg and "
            f"{root}/labels/train1.txt; or place the VTAB-1k lists in "
            f"{os.path.join(data_dir, 'vtab-1k', 'dtd')}"
        ) from None
    lists = _required("dtd release", data_dir)
    names = [
        [line.strip() for line in _read_text(path).splitlines() if line.strip()] for path in lists
    ]
    # Class i is the i-th class name in sorted order, as in TFDS and torchvision.
    classes = sorted({name.split("/")[0] for split in names for name in split})
    splits = []
    for path, split_names, split, count in zip(
        lists, names, ("train", "validation", "test"), (800, 200, None), strict=True
    ):
        samples = [
            (os.path.join(root, "images", name), classes.index(name.split("/")[0]))
            for name in _tfds_order(split_names, split)[:count]
        ]
        _check_samples(samples, path, len(classes))
        splits.append(samples)
    train = splits[0] + splits[1]
    test = splits[2]
    return train, test, classes


def _fgvc(name, folder):
    """The samples of an FGVC set's train.json and test.json, with VPT's class ids remapped."""
    _, image_folder, num_classes = FGVC_TASKS[name]
    image_dir = os.path.join(folder, image_folder)
    if not os.path.isdir(image_dir):
        image_dir = folder  # where the official ARC code keeps Stanford Dogs' images
    list_files = _required("fgvc", folder)
    annotations = []
    for path in list_files:
        try:
            annotations.append(dict(json.loads(_read_text(path))))
        except (ValueError, TypeError) as e:  # not json, or json of something else than a mapping
            raise DataError(
                f"{path} should map image paths to class ids, as VPT's json files do "
                f"({_reason(e)}): download it again"
            ) from None
    # VPT numbers the classes 0..C-1 in the sorted order of their ids.
    class_ids = sorted({class_id for ids in annotations for class_id in ids.values()})
    index = {class_id: i for i, class_id in enumerate(class_ids)}
    train, test = (
        [(os.path.join(image_dir, path), index[class_id]) for path, class_id in ids.items()]
        for ids in annotations
    )
    _check_samples(train, list_files[0], num_classes)
    _check_samples(test, list_files[1], num_classes)
    # A partial copy of the set may lack some classes: the head keeps its size all the same.
    classes = [str(class_id) for class_id in class_ids]
    classes += [f"(no images) {i}" for i in range(len(classes), num_classes)]
    return train, test, classes


def _unreadable_folder(error):
    # os.walk's onerror: a folder that cannot be listed is an error, not a folder with no images.
    raise DataError(f"cannot read the folder {error.filename} ({_reason(error)}): make it readable")


def _class_folders(split_dir):
    """The names of the class folders in `split_dir`, sorted."""
    return sorted(next(os.walk(split_dir, onerror=_unreadable_folder))[1])


def _scan(split_dir, class_index):
    """[(path, label)] of the images in each class folder of `split_dir`, sorted by folder and name.

    Links to folders are followed, but each real folder is walked once: a link loop neither lists
    its images again nor makes the walk exponential.
    """
    samples = []
    names = _class_folders(split_dir)
    # the real paths of the folders walked, or not to walk from another class's folder
    seen = {os.path.realpath(os.path.join(split_dir, name)) for name in names}
    split = os.path.realpath(split_dir)
    for name in names:
        if name not in class_index:
            raise DataError(
                f"class folder {os.path.join(split_dir, name)} has no counterpart in "
                f"{os.path.join(os.path.dirname(split_dir), 'train')}: the classes must match"
            )
        class_dir = os.path.join(split_dir, name)
        for parent, folders, files in os.walk(
            class_dir, onerror=_unreadable_folder, followlinks=True
        ):
            real = os.path.realpath(parent)
            # not a folder walked already, another class's, nor the split or above it: a link
            # back there would list the other classes' images under this one
            if parent != class_dir and (real in seen or os.path.commonpath([real, split]) == real):
                folders.clear()
                continue
            seen.add(real)
            folders.sort()  # walked in the same order whatever order the file system lists
            images = sorted(file for file in files if file.lower().endswith(IMG_EXTENSIONS))
            samples += [(os.path.join(parent, image), class_index[name]) for image in images]
    _check_samples(samples, f"the class folders of {split_dir}", len(class_index))
    return samples


def _folder(_, path):
    """The samples of a folder of train/ and test/ (or val/) class folders."""
    train_dir, test_dir = _required("folder", path)
    classes = _class_folders(train_dir)
    class_index = {name: i for i, name in enumerate(classes)}
    train = _scan(train_dir, class_index)
    test = _scan(test_dir, class_index)
    return train, test, classes


def _rgb(image):
    """A PIL image of any mode as 8-bit RGB.

    convert("RGB") would clip 16-bit greys (16-bit PNGs and TIFFs, modes I;16 and I) to white, so
    they are scaled from 0..65535 to 0..255. Float greys (mode F) are on PIL's 0..255 scale, which
    convert() keeps. Palettes with a transparent colour go through RGBA, as PIL asks.
    """
    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _resize(image, size, recipe):
    """A PIL image resized by `recipe`.

    "vtab": Resize((size, size)) bicubic, by PIL's own resize. "fgvc": Resize(size * 256/224) of
    the shorter side, bilinear (256 for 224, as in VPT and ARC). "fgvc centre": that, then
    CenterCrop(size).
    """
    if recipe == "vtab":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    image = v2.functional.resize(image, [round(size * 256 / 224)])
    if recipe == "fgvc centre":
        image = v2.functional.center_crop(image, [size])
    return image


def _load(path, size, recipe):
    """Image `path` decoded, made RGB and resized by `recipe`: uint8 (3, h, w)."""
    try:
        with Image.open(path) as image:
            return v2.functional.pil_to_tensor(_resize(_rgb(image), size, recipe))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # What PIL raises on bad files; _check_samples has ruled out missing and unreadable ones.
        raise DataError(
            f"cannot decode image {path} ({_reason(e)}): it is damaged or not an image; replace "
            f"it from the original dataset"
        ) from None


def _decode(samples, split, recipe, size, workers, log):
    """The (path, label) samples decoded by `workers` threads and resized by `recipe`: a Resized
    split for "fgvc", whose images differ in size, and a Preloaded one for the others.

    Large splits take minutes: SUN397's test set has 21,750 images.
    """
    began = time.perf_counter()
    load = functools.partial(_load, size=size, recipe=recipe)
    pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="decode")
    try:
        images = list(pool.map(load, [path for path, _ in samples]))
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C or a bad image, drop the queued ones
    shapes = torch.tensor([image.shape[1:] for image in images])
    pixels = torch.empty(sum(image.numel() for image in images), dtype=torch.uint8)
    start = 0
    for i, image in enumerate(images):
        pixels[start : start + image.numel()] = image.flatten()
        start += image.numel()
        images[i] = None  # released as copied: the largest splits (GBs) are held once, not twice
    labels = torch.tensor([label for _, label in samples])
    if log is not None:
        seconds = time.perf_counter() - began
        log(
            f"decoded {len(samples):,} {split} images in {seconds:.1f} s "
            f"({len(samples) / seconds:.0f} images/s)"
        )
    if recipe == "fgvc":
        return Resized(pixels, shapes, labels, size)
    return Preloaded(pixels.view(len(labels), 3, size, size), labels)


def _synthetic(img_size):
    """The synthetic task, generated at img_size from seed 0.

    Class k has its mean colour at angle 2 pi k / 10 on a colour wheel, a sinusoidal grating at
    angle pi k / 10 with a random phase, and pixel noise. The mean colour alone separates the
    classes, so that even a head on frozen random features learns them; the grating gives adapters
    something to find.
    """
    generator = torch.Generator().manual_seed(0)
    steps = torch.linspace(0, 1, img_size)
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    channel_offsets = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    splits = []
    for per_class in (SYNTHETIC_TRAIN, SYNTHETIC_TEST):
        labels = torch.arange(SYNTHETIC_CLASSES).repeat_interleave(per_class)
        k = labels.float()
        wheel = 2 * math.pi * k[:, None] / SYNTHETIC_CLASSES
        colour = 0.5 + 0.25 * torch.cos(wheel + channel_offsets)  # (N, 3)
        angle = (math.pi * k / SYNTHETIC_CLASSES)[:, None, None]
        phase = 2 * math.pi * torch.rand(len(labels), 1, 1, generator=generator)
        waves = x * torch.cos(angle) + y * torch.sin(angle)  # (N, S, S)
        grating = torch.sin(2 * math.pi * 4 * waves + phase)
        noise = 0.05 * torch.randn(len(labels), 3, img_size, img_size, generator=generator)
        images = colour[:, :, None, None] + 0.1 * grating[:, None] + noise  # (N, 3, S, S)
        splits.append(Preloaded((images.clamp(0, 1) * 255).round().to(torch.uint8), labels))
    train, test = splits
    description = (
        f"synthetic: {SYNTHETIC_CLASSES} classes of coloured oriented gratings, {len(train)} "
        f"train / {len(test)} test images at {img_size}x{img_size} (seed 0)"
    )
    return Task(train, test, [f"class {k}" for k in range(SYNTHETIC_CLASSES)], description)
