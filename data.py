"""Datasets for ARC runs: the 19 VTAB-1k tasks, DTD, the five FGVC sets, any image folder, a synthetic set.

    task = build("dtd", data_dir="./data", img_size=224, workers=4)
    task.train, task.test          # torch Datasets yielding (uint8 tensor (3, H, W), int label)
    task.classes, task.description # class names (label i is classes[i]); one line for the log
    for images, labels in Loader(task.train, device)(index_batches, seed): ...  # uint8 batches on the device

Every image is decoded and resized once, by `workers` processes, when the task is built; a Loader gathers
batches where the split lives (on the device when it fits there) and normalize() converts them to float on
the device, so loading never starves a GPU. VTAB-1k, DTD, image folders: Resize((S, S)) bicubic, the VTAB
recipe (PIL's resize(BICUBIC) on the official scripts' PIL images). FGVC, as VPT and ARC: Resize(S * 256/224)
of the shorter side, bilinear; then CenterCrop(S) for testing, once, and for training RandomCrop(S) and a
horizontal flip, drawn from the epoch's seed (Resized.crops) and gathered for each batch.

Names and the files they are read from, under data_dir (_required_files):
  <VTAB task>  vtab-1k/<task>/train800val200.txt (train) and test.txt (test), lines '<image path relative
               to vtab-1k/<task>/> <label>', as NOAH (get_vtab1k.py), RepAdapter, SSF and ARC read them.
  dtd          those lists when vtab-1k/dtd/train800val200.txt exists (the paper's images); else torchvision's
               release in dtd/dtd/{images,labels}, downloaded when absent, on the VTAB-1k protocol (_dtd).
  cub nabirds flowers dogs cars
               fgvc/<folder>/{train,test}.json of VPT's splits, mapping an image path (relative to the image
               folder in FGVC_TASKS) to a class id (remapped to 0..C-1 in sorted order); val.json, a part of
               the training set, is left out, as VPT and ARC do.
  synthetic    10 classes of coloured, oriented gratings with noise, generated at img_size (seed 0).
  a path       (any name with a path separator, or an existing folder) with train/ and test/ (or val/)
               class subfolders, as torchvision's ImageFolder; the classes are train/'s subfolders.
"""

import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from typing import NamedTuple

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

MEAN, STD = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)  # ImageNet; train.py normalises on the device

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
FGVC_TASKS = {  # name -> (folder under <data_dir>/fgvc as ARC names it, image folder in it, classes)
    "cub": ("CUB_200_2011", "images", 200),
    "nabirds": ("NABirds", "images", 555),
    "flowers": ("OxfordFlowers", "", 102),
    "dogs": ("StanfordDogs", "Images", 120),
    "cars": ("StanfordCars", "", 196),
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
LAYOUTS = {  # kind -> what its files should be, for the message when one is missing
    "vtab": "expected the VTAB-1k layout of NOAH/RepAdapter/SSF: vtab-1k/<task>/{train800val200,test}.txt, "
    "lines '<image path relative to the task folder> <label>' (NOAH's get_vtab1k.py makes them)",
    "fgvc": "expected VPT's split files {train,val,test}.json (cornell.box.com/v/vptfgvcsplits) next to the images",
    "dtd release": "dtd/dtd is not a complete DTD release (images/<class>/*.jpg and labels/{train,val,test}1.txt): "
    "delete it to download it again",
    "folder": "--data needs train/ and test/ (or val/) subfolders with a folder of images per class, as "
    "torchvision's ImageFolder: train/<class>/xxx.jpg",
}
SYNTHETIC_CLASSES, SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10, 50, 20  # images per class
CORES = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)  # ours to use


class DataError(Exception):
    """A dataset that is missing or broken; the message says what, where, and how to fix it."""


class Task(NamedTuple):
    train: Dataset
    test: Dataset
    classes: (
        list  # class names, label i being classes[i] (the label itself where a list gives no names)
    )
    description: str  # one line for the log: what was loaded from where, how many images

    num_classes = property(lambda self: len(self.classes))


class Preloaded(Dataset):
    """A whole dataset decoded once: images uint8 (N, 3, H, W), labels int64 (N,)."""

    def __init__(self, images, labels):
        self.images, self.labels, self.nbytes = images, labels, images.numel()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def to(self, device):
        return Preloaded(self.images.to(device), self.labels.to(device))


class Resized(Dataset):
    """A training split resized once, to crop per batch: the images differ in size, so their (3, h, w) uint8
    pixels lie one after another in one tensor, `pixels`, from `offsets`, with `shapes` int64 (N, 2) their (h, w),
    and a batch of crops is one gather. Labels int64 (N,); `size` the crops' side; item i: image i, uncropped."""

    def __init__(self, pixels, shapes, labels, size):
        self.pixels, self.shapes, self.labels, self.size, self.nbytes = (
            pixels,
            shapes,
            labels,
            size,
            pixels.numel(),
        )
        areas = 3 * shapes[:, 0] * shapes[:, 1]
        self.offsets = areas.cumsum(0) - areas

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        (height, width), start = self.shapes[index].tolist(), int(self.offsets[index])
        return self.pixels[start : start + 3 * height * width].view(3, height, width), int(
            self.labels[index]
        )

    def to(self, device):
        return Resized(
            self.pixels.to(device), self.shapes.to(device), self.labels.to(device), self.size
        )

    def crops(self, epoch_seed):
        """(tops, lefts, flips) of every image in the epoch of `epoch_seed`, on the split's device, as RandomCrop and
        RandomHorizontalFlip draw them. A private generator: image i gets the same whoever draws it and when (a
        resumed run sees an uninterrupted one's crops), and the global ones, which dropout uses, are untouched."""
        draws = torch.rand(
            len(self), 3, generator=torch.Generator().manual_seed(epoch_seed), dtype=torch.float64
        )
        tops, lefts = (draws[:, :2] * (self.shapes.cpu() - self.size + 1)).long().unbind(1)
        return tuple(t.to(self.pixels.device) for t in (tops, lefts, draws[:, 2] < 0.5))

    def batch(self, index, crops):
        """uint8 (B, 3, size, size): images `index` cropped and flipped as `crops` say. Row (c, y) of a crop: the `size`
        pixels from offset + c h w + (top + y) w + left, gathered at once from pixels.unfold's view (no copy)."""
        tops, lefts, flips = (t[index] for t in crops)
        heights, widths = self.shapes[index, :, None, None].unbind(1)
        steps = torch.arange(self.size, device=index.device)
        planes = (
            self.offsets[index, None, None]
            + torch.arange(3, device=index.device)[:, None] * heights * widths
        )
        starts = (
            planes + (tops[:, None, None] + steps) * widths + lefts[:, None, None]
        )  # (B, 3, size)
        rows = (
            self.pixels.unfold(0, self.size, 1)
            .index_select(0, starts.flatten())
            .view(*starts.shape, self.size)
        )
        return torch.where(flips[:, None, None, None], rows.flip(-1), rows)


def fits_on_device(nbytes, device):
    """Whether a split of `nbytes` may live on `device` whole: on a GPU, in at most half of its free memory (the
    driver's, and what torch caches unused), the rest being for the model, its activations and the next split."""
    cached = (
        torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device.type == "cuda"
        else 0
    )
    return device.type != "cuda" or nbytes <= (torch.cuda.mem_get_info(device)[0] + cached) // 2


class Loader:
    """Batches of a split as uint8 images and labels on `device`, for lists of indices (a Resized split cropped as
    the epoch's seed says), each one gather where the split lives: on the device when it fits there, else in
    host memory, which sends the batch alone (pinned, so that the copy overlaps the GPU's work)."""

    def __init__(self, split, device):
        self.device = device
        self.split = split.to(
            device if fits_on_device(split.nbytes, device) else torch.device("cpu")
        )

    def __len__(self):
        return len(self.split)

    def __call__(self, index_batches, seed=0):
        if (
            not index_batches
        ):  # under torchrun, a small test set can leave a process nothing to test
            return
        home = self.split.labels.device
        crops = self.split.crops(seed) if isinstance(self.split, Resized) else None  # once an epoch
        order = torch.cat(index_batches).to(home)  # one copy for the epoch, then slices of it
        for index in order.split([len(i) for i in index_batches]):
            images = self.split.images[index] if crops is None else self.split.batch(index, crops)
            labels = self.split.labels[index]
            if home.type != self.device.type:
                images, labels = (
                    t.pin_memory().to(self.device, non_blocking=True) for t in (images, labels)
                )
            yield images, labels


@functools.cache
def _mean_std(device):
    # made once per device: a tensor built from a list every step would be a blocking copy every step
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))


def normalize(images):
    """uint8 (B, 3, H, W) -> float32, normalised with the ImageNet MEAN and STD, on the images' device."""
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


def build(name, data_dir="./data", img_size=224, workers=min(4, CORES), log=print):
    """The Task called `name` (module docstring), or DataError; `log` gets a line a decoded split (None: silent)."""
    kind = _kind(name, data_dir)
    if kind == "synthetic":
        return _synthetic(img_size)
    check(name, data_dir)
    train, test, classes, description = {
        "vtab": _vtab,
        "dtd release": _dtd,
        "fgvc": _fgvc,
        "folder": _folder,
    }[kind](name, data_dir)
    decode = lambda samples, recipe, split: _decode(
        samples, functools.partial(_resize, size=img_size, recipe=recipe), workers, split, log
    )
    square = lambda pixels, shapes, labels: Preloaded(
        pixels.view(len(labels), 3, img_size, img_size), labels
    )
    if kind == "fgvc":
        return Task(
            Resized(*decode(train, "fgvc", "train"), img_size),
            square(*decode(test, "fgvc centre", "test")),
            classes,
            f"{description}, random {img_size} crops + flips for training, centre crops for testing",
        )
    return Task(
        square(*decode(train, "vtab", "train")),
        square(*decode(test, "vtab", "test")),
        classes,
        f"{description}, resized to {img_size}x{img_size}",
    )


def missing(name, data_dir="./data"):
    """The first file or folder `name` reads that is not there (None: all are, or DTD can be downloaded); cheap."""
    kind = _kind(name, data_dir)
    there = os.path.isdir if kind == "folder" else os.path.isfile
    return next((path for path in _required_files(kind, name, data_dir) if not there(path)), None)


def check(name, data_dir="./data"):
    """Raise DataError naming the first missing file (see missing()) and the layout it belongs to."""
    if absent := missing(name, data_dir):
        raise DataError(f"no {name} data: {absent} is missing; {LAYOUTS[_kind(name, data_dir)]}")


def _required_files(kind, name, data_dir):
    """The files or folders a dataset of `kind` is read from, in order: the layouts that build() and missing() use."""
    if kind == "vtab":
        return [
            os.path.join(data_dir, "vtab-1k", name, file)
            for file in ("train800val200.txt", "test.txt")
        ]
    if kind == "fgvc":
        return [
            os.path.join(data_dir, "fgvc", FGVC_TASKS[name][0], file)
            for file in ("train.json", "test.json")
        ]
    if (
        kind == "dtd release"
    ):  # downloaded when its folder is absent; a folder there must be complete
        root = os.path.join(data_dir, "dtd", "dtd")
        return (
            [os.path.join(root, "labels", f"{split}1.txt") for split in ("train", "val", "test")]
            if os.path.isdir(root)
            else []
        )
    if kind == "folder":  # test/, or else val/
        has = lambda folder: os.path.isdir(os.path.join(name, folder))
        return [
            os.path.join(name, "train"),
            os.path.join(name, "val" if has("val") and not has("test") else "test"),
        ]
    return []  # synthetic: generated


def is_path(name):
    """Whether --data names a folder rather than a dataset: a dataset's name is a folder only written as a path."""
    return (
        os.sep in name
        or "/" in name
        or os.path.isdir(name)
        and name not in ("synthetic", *VTAB_TASKS, *FGVC_TASKS)
    )


def _kind(name, data_dir):
    if name == "dtd" and not os.path.isfile(
        os.path.join(data_dir, "vtab-1k", "dtd", "train800val200.txt")
    ):
        return "dtd release"
    for kind, names in (("synthetic", ["synthetic"]), ("vtab", VTAB_TASKS), ("fgvc", FGVC_TASKS)):
        if name in names:
            return kind
    if is_path(name):
        return "folder"
    raise DataError(
        f"unknown dataset {name!r}: choose synthetic, a VTAB-1k task ({', '.join(VTAB_TASKS)}), "
        f"an FGVC set ({', '.join(FGVC_TASKS)}), a suite ({', '.join(SUITES)}), or a path to a "
        f"folder with train/ and test/ class subfolders"
    )


def _reason(error):
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _resize(image, size, recipe):
    """A PIL image resized by `recipe`: "vtab" Resize((size, size)) bicubic (PIL's own resize); "fgvc" Resize(size *
    256/224) of the shorter side, bilinear (256 for 224, as VPT and ARC); "fgvc centre" that, then CenterCrop."""
    if recipe == "vtab":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    image = v2.functional.resize(image, [round(size * 256 / 224)])
    return v2.functional.center_crop(image, [size]) if recipe == "fgvc centre" else image


def _decode_chunk(paths, transform):
    """In a worker: (the (3, h, w) uint8 pixels of `paths` transformed, one after another: one block of shared
    memory, not one an image; their (h, w); ''), or ('', '', the message of a bad file, for the caller to raise)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(v2.functional.pil_to_tensor(transform(image.convert("RGB"))))
        except (
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as e:  # what PIL raises on bad files
            return (
                "",
                "",
                (
                    f"cannot decode image {path} ({_reason(e)}): the file is corrupt or not an image; "
                    f"replace it from the original dataset"
                ),
            )
    return (
        torch.cat([image.flatten() for image in images]),
        torch.tensor([image.shape[1:] for image in images]),
        "",
    )


def _decode(samples, transform, workers, split, log):
    """(pixels, shapes, labels) of the (path, label) samples, decoded once by `workers` processes: see Resized.
    Large splits take minutes (SUN397's test set is 21,750 images): progress shows on a terminal's line."""
    chunks, shapes, began, show = [], [], time.time(), log is not None and sys.stderr.isatty()
    options = {
        "num_workers": workers,
        "collate_fn": functools.partial(_decode_chunk, transform=transform),
    }
    if workers and "forkserver" in multiprocessing.get_all_start_methods():
        # Workers from a fork server, not forked from this process: a fork taken while another thread holds a lock
        # (torch.distributed's, a loader's queue feeder) can hang at birth. The server imports this module once.
        options["multiprocessing_context"] = multiprocessing.get_context("forkserver")
        options["multiprocessing_context"].set_forkserver_preload([__name__])
    for pixels, sizes, error in DataLoader([path for path, _ in samples], batch_size=64, **options):
        if error:
            raise DataError(error)
        chunks.append(pixels)
        shapes.append(sizes)
        if show:
            done = sum(map(len, shapes))
            print(
                f"\rdecoding {split}: {done:,}/{len(samples):,} images, {done / (time.time() - began):.0f} "
                f"images/s ",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if show:
        print("\r\033[K", end="", file=sys.stderr)  # clear the progress line
    # chunks released as copied, pages taken as written: the largest splits (GBs) held about once, not twice
    pixels, start = torch.empty(sum(map(len, chunks)), dtype=torch.uint8), 0
    for i, chunk in enumerate(chunks):
        pixels[start : start + len(chunk)], start, chunks[i] = chunk, start + len(chunk), None
    if log is not None:
        seconds = max(time.time() - began, 1e-9)
        log(
            f"decoded {len(samples):,} {split} images in {seconds:.1f} s ({len(samples) / seconds:.0f} images/s)"
        )
    return (
        pixels,
        torch.cat(shapes),
        torch.tensor([label for _, label in samples], dtype=torch.int64),
    )


def _validate(samples, source, num_classes):
    """Fail early, in the calling process, on an empty split, a label out of range or a missing image."""
    if not samples:
        raise DataError(f"{source} lists no images")
    bad = next((label for _, label in samples if not 0 <= label < num_classes), None)
    if bad is not None:
        raise DataError(
            f"{source}: label {bad} is outside 0..{num_classes - 1} (is it the right file?)"
        )
    absent = [path for path, _ in samples if not os.path.isfile(path)]
    if absent:
        raise DataError(
            f"image {absent[0]} listed in {source} does not exist ({len(absent)} of "
            f"{len(samples)} listed images are missing; is the dataset fully extracted?)"
        )


def _read_lines(text_file):
    """The lines of a list file, read as UTF-8 whatever the locale."""
    try:
        with open(text_file, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{text_file} is not UTF-8 text (byte {e.start}): is it the list file, and complete?"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {text_file} ({_reason(e)})") from None


def _vtab(name, data_dir):
    """The samples of the two lists, from their lines '<image path relative to the task folder> <label>'."""
    folder, splits = os.path.join(data_dir, "vtab-1k", name), []
    for list_file in _required_files("vtab", name, data_dir):
        splits.append([])
        for number, line in enumerate(_read_lines(list_file), 1):
            try:
                if line.strip():
                    relative, label = line.strip().rsplit(maxsplit=1)
                    splits[-1].append((os.path.join(folder, relative), int(label)))
            except ValueError:
                raise DataError(
                    f"{list_file}, line {number}: expected '<image path> <label>', got {line!r}"
                ) from None
        _validate(splits[-1], list_file, VTAB_TASKS[name])
    train, test = splits
    return (
        train,
        test,
        [str(label) for label in range(VTAB_TASKS[name])],
        (
            f"VTAB-1k {name} from {folder}: {len(train)} train (train800val200.txt) / {len(test)} test images"
        ),
    )


def _dtd(_, data_dir):
    """DTD's release (torchvision downloads it when its folder is absent) on the VTAB-1k protocol: the first 800
    images of train1 and 200 of val1 in TFDS order (by md5(split name + file name), as TFDS stores them and VTAB's
    'train[:800]' and 'validation[:200]' slice them; the lists group them by class), and test1."""
    root, url = os.path.join(data_dir, "dtd", "dtd"), torchvision.datasets.DTD._URL
    try:
        if not os.path.isdir(root):  # the same test torchvision makes before downloading
            torchvision.datasets.DTD(data_dir, download=True)
    except (
        Exception
    ) as e:  # no network, a proxy's error page, a truncated archive: all leave no data
        raise DataError(
            f"DTD not found in {root}/images and downloading {url} failed ({_reason(e)}). Offline: put "
            f"that file at {os.path.dirname(root)}/{os.path.basename(url)} (checked and extracted on the "
            f"next run), or extract it: {root}/images/<class>/*.jpg and {root}/labels/train1.txt; or "
            f"place the VTAB-1k lists in {os.path.join(data_dir, 'vtab-1k', 'dtd')}"
        ) from None
    lists = dict(
        zip(("train", "validation", "test"), _required_files("dtd release", "dtd", data_dir))
    )
    names = {
        split: [line.strip() for line in _read_lines(file) if line.strip()]
        for split, file in lists.items()
    }
    classes = sorted(
        {name.split("/")[0] for split in names.values() for name in split}
    )  # as TFDS, torchvision
    tfds_order = lambda split: sorted(
        names[split], key=lambda name: hashlib.md5((split + name).encode()).digest()
    )
    samples = {}
    for split, chosen in (
        ("train", tfds_order("train")[:800]),
        ("validation", tfds_order("validation")[:200]),
        ("test", names["test"]),
    ):
        samples[split] = [
            (os.path.join(root, "images", name), classes.index(name.split("/")[0]))
            for name in chosen
        ]
        _validate(samples[split], lists[split], len(classes))
    train, test = samples["train"] + samples["validation"], samples["test"]
    return (
        train,
        test,
        classes,
        (
            f"DTD partition 1 from {root} on the VTAB-1k protocol: {len(train)} train (first 800 "
            f"of train1 + 200 of val1 in TFDS order) / {len(test)} test images, {len(classes)} "
            f"classes"
        ),
    )


def _fgvc(name, data_dir):
    folder, subfolder, num_classes = FGVC_TASKS[name]
    train_file, test_file = _required_files("fgvc", name, data_dir)
    root, image_dir = (
        os.path.dirname(train_file),
        os.path.join(os.path.dirname(train_file), subfolder),
    )
    annotations = []
    for file in (train_file, test_file):
        try:
            with open(file) as f:
                annotations.append(json.load(f))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{file} is not valid json ({_reason(e)}): download it again") from None
        if not isinstance(annotations[-1], dict):
            raise DataError(f"{file} should map image paths to class ids")
    train, test = annotations
    index = {
        class_id: i for i, class_id in enumerate(sorted(set(train.values())))
    }  # VPT's remapping
    unknown = next((class_id for class_id in test.values() if class_id not in index), None)
    if unknown is not None:
        raise DataError(f"{test_file}: class id {unknown!r} never occurs in {train_file}")
    train, test = (
        [(os.path.join(image_dir, path), index[class_id]) for path, class_id in annotations.items()]
        for annotations in (train, test)
    )
    _validate(train, train_file, num_classes)
    _validate(test, test_file, num_classes)
    names = [
        str(class_id) for class_id in index
    ]  # a partial copy of the set may miss some: the head keeps its size
    return (
        train,
        test,
        names + [f"(no images) {i}" for i in range(len(names), num_classes)],
        (
            f"FGVC {folder} from "
            f"{root} (VPT json): {len(train)} train (train.json) / {len(test)} test images, {len(index)} classes"
        ),
    )


def _scan(split_dir, class_index):
    """[(path, label)] for the images under each class subfolder of split_dir, sorted as ImageFolder does."""
    samples = []
    for entry in sorted(
        (entry for entry in os.scandir(split_dir) if entry.is_dir()), key=lambda entry: entry.name
    ):
        if entry.name not in class_index:
            raise DataError(
                f"class folder {entry.path} has no counterpart in "
                f"{os.path.join(os.path.dirname(split_dir), 'train')}: the classes must match"
            )
        for parent, _, files in sorted(os.walk(entry.path, followlinks=True)):
            samples += [
                (os.path.join(parent, file), class_index[entry.name])
                for file in sorted(files)
                if file.lower().endswith(IMG_EXTENSIONS)
            ]
    if not samples:
        raise DataError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) in the class subfolders of {split_dir}"
        )
    return samples


def _folder(path, _):
    train_dir, test_dir = _required_files("folder", path, None)
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    class_index = {name: i for i, name in enumerate(classes)}
    train, test = _scan(train_dir, class_index), _scan(test_dir, class_index)
    return (
        train,
        test,
        classes,
        (
            f"image folder {path}: {len(train)} train / {len(test)} "
            f"{os.path.basename(test_dir)} images, {len(classes)} classes"
        ),
    )


def _synthetic(img_size):
    """Class k: mean colour at angle 2 pi k / 10 on a colour wheel, a sinusoidal grating at angle pi k / 10 with a
    random phase, pixel noise. The mean colour alone separates the classes, so even a head on frozen random
    features learns them; the grating gives adapters something to find."""
    generator, splits = torch.Generator().manual_seed(0), []
    y, x = torch.meshgrid(
        torch.linspace(0, 1, img_size), torch.linspace(0, 1, img_size), indexing="ij"
    )
    channel_offsets = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    for per_class in (SYNTHETIC_TRAIN, SYNTHETIC_TEST):
        labels = torch.arange(SYNTHETIC_CLASSES).repeat_interleave(per_class)
        n, k = len(labels), labels.float()
        colour = 0.5 + 0.25 * torch.cos(
            2 * math.pi * k[:, None] / SYNTHETIC_CLASSES + channel_offsets
        )
        angle = (math.pi * k / SYNTHETIC_CLASSES)[:, None, None]
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
        grating = torch.sin(2 * math.pi * 4 * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
        noise = 0.05 * torch.randn(n, 3, img_size, img_size, generator=generator)
        images = colour[:, :, None, None] + 0.1 * grating[:, None] + noise
        splits.append(Preloaded((images.clamp(0, 1) * 255).round().to(torch.uint8), labels))
    return Task(
        *splits,
        [f"class {k}" for k in range(SYNTHETIC_CLASSES)],
        f"synthetic: {SYNTHETIC_CLASSES} classes of coloured oriented gratings, {len(splits[0])} train / "
        f"{len(splits[1])} test images at {img_size}x{img_size} (seed 0)",
    )
