"""Datasets for ARC runs: the 19 VTAB-1k tasks, DTD, the five FGVC sets, any image folder, a synthetic set.

    task = build("dtd", data_dir="./data", img_size=224, workers=4)
    task.train, task.test          # torch Datasets yielding (uint8 tensor (3, H, W), int label)
    task.classes, task.description # class names (label i is classes[i]); one line for the log
    for images, labels in Loader(task.train, device, workers)(index_batches): ...   # uint8 on the device

Every image comes out as uint8 (3, H, W); a Loader hands batches of them to the device, where
normalize() converts to float and normalises with MEAN/STD, so loading never starves a GPU. Where the transform is
deterministic (VTAB-1k, DTD, image folders, synthetic: Resize((img_size, img_size)) bicubic, the
official VTAB recipe) each image is decoded and resized once, by `workers` processes, into a
Preloaded dataset that can live on the GPU whole. The resize is PIL's Image.resize(BICUBIC), which
is what torchvision's Resize does to the PIL images of the official scripts. FGVC trains with random
crops and flips, so its Datasets decode on the fly.

Names and layouts under data_dir:
  <VTAB task>  vtab-1k/<task>/train800val200.txt (train) and test.txt (test), lines
               '<image path relative to vtab-1k/<task>/> <label>', as NOAH, RepAdapter, SSF and ARC
               read them (NOAH's get_vtab1k.py writes 'images/<split>/000000.jpg 12').
  dtd          the VTAB-1k lists above when vtab-1k/dtd/train800val200.txt exists (the paper's exact
               images); otherwise torchvision's DTD release under dtd/dtd/{images,labels}, downloaded
               when absent, on the VTAB-1k protocol: train = the first 800 images of train1 plus the
               first 200 of val1 in TFDS order (records sorted by md5(split name + file name), as
               TFDS stores them and VTAB's 'train[:800]' / 'validation[:200]' slices them), test =
               all of test1. Not the list files' order: the release groups them by class, so their
               first 800 lines would miss most classes.
  cub nabirds flowers dogs cars
               fgvc/<folder>/{train,test}.json from VPT's splits, mapping an image path (relative to
               the image folder in FGVC_TASKS) to a class id; ids become 0..C-1 in sorted order.
               Train on train.json alone, test on test.json: what VPT (train.py) and ARC
               (FGVC_ARC_train.py) do for FGVC; val.json (a part of the official training set) is
               left out, as there. Train: Resize(img_size * 256/224) + RandomCrop + horizontal flip;
               test: the same Resize + CenterCrop; bilinear, torchvision's default, as VPT and ARC.
  synthetic    10 classes of coloured, oriented gratings with noise, generated at img_size (seed 0).
  a path       (any name with a path separator, or an existing folder) with train/ and test/ (or
               val/) class subfolders, as torchvision's ImageFolder; classes are train/'s subfolders.
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
from torchvision.transforms.functional import pil_to_tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet; train.py normalises on the device

VTAB_TASKS = {  # task folder -> number of classes
    "caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "patch_camelyon": 2, "sun397": 397, "svhn": 10, "resisc45": 45, "eurosat": 10, "dmlab": 6,
    "kitti": 4, "smallnorb_azi": 18, "smallnorb_ele": 9, "dsprites_loc": 16, "dsprites_ori": 16,
    "clevr_dist": 6, "clevr_count": 8, "diabetic_retinopathy": 5,
}
FGVC_TASKS = {  # name -> (folder under <data_dir>/fgvc as ARC names it, image folder in it, classes)
    "cub": ("CUB_200_2011", "images", 200),
    "nabirds": ("NABirds", "images", 555),
    "flowers": ("OxfordFlowers", "", 102),
    "dogs": ("StanfordDogs", "Images", 120),
    "cars": ("StanfordCars", "", 196),
}
VTAB_GROUPS = {  # the paper's Table 1, in its order
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}
SUITES = {"vtab-1k": [task for tasks in VTAB_GROUPS.values() for task in tasks], "fgvc": list(FGVC_TASKS)}
VTAB_LAYOUT = ("the VTAB-1k layout of NOAH/RepAdapter/SSF: vtab-1k/<task>/train800val200.txt and test.txt "
               "with lines '<image path relative to the task folder> <label>' (NOAH's get_vtab1k.py makes them)")
SYNTHETIC_CLASSES, SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10, 50, 20  # images per class


class DataError(Exception):
    """A dataset that is missing or broken; the message says what, where, and how to fix it."""


class Task(NamedTuple):
    train: Dataset
    test: Dataset
    classes: list  # class names, label i being classes[i] (the label itself where a list gives no names)
    description: str  # one line for the log: what was loaded from where, how many images

    @property
    def num_classes(self):
        return len(self.classes)


class Preloaded(Dataset):
    """A whole dataset decoded once: images uint8 (N, 3, H, W), labels int64 (N,)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


class Loader:
    """Batches of a split as uint8 images and labels on `device`, for lists of indices. A Preloaded split
    moves to the device whole, so a batch is one gather there; others are decoded by DataLoader workers
    (FGVC's random crops, the same for image i in epoch e whichever worker decodes it: `seed`)."""

    def __init__(self, split, device, workers):
        self.split, self.device, self.workers = split, device, workers
        if isinstance(split, Preloaded):
            self.images, self.labels = split.images.to(device), split.labels.to(device)

    def __len__(self):
        return len(self.split)

    def __call__(self, index_batches, seed=0):
        if not index_batches:  # under torchrun, a small test set can leave a process nothing to test
            return
        if isinstance(self.split, Preloaded):
            order = torch.cat(index_batches).to(self.device)  # one copy for the epoch, then slices of it
            for index in order.split([len(i) for i in index_batches]):
                yield self.images[index], self.labels[index]
            return
        self.split.seed = seed
        loader = DataLoader(self.split, batch_sampler=[i.tolist() for i in index_batches], pin_memory=self.device.type
                            == "cuda", generator=torch.Generator(), **workers_kw(self.workers))  # not dropout's RNG
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def workers_kw(workers):
    """DataLoader options for `workers` decoding processes, started by a fork server rather than forked from
    this process: a fork taken while another thread holds a lock (torch.distributed's under torchrun, a
    finished loader's queue feeder) can leave the worker hung at birth, and the whole run with it. The
    server imports this module once, so a worker starts in milliseconds."""
    if not workers or "forkserver" not in multiprocessing.get_all_start_methods():
        return {"num_workers": workers}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return {"num_workers": workers, "multiprocessing_context": context}


@functools.cache
def _mean_std(device):
    # made once per device: a tensor built from a list every step would be a blocking copy every step
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))


def normalize(images):
    """uint8 (B, 3, H, W) -> float32, normalised with the ImageNet MEAN and STD, on the images' device."""
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


def build(name, data_dir="./data", img_size=224, workers=4, log=print):
    """The Task called `name` (see the module docstring); raises DataError when it cannot be loaded.
    `log` receives a line per decoded split (None: silent)."""
    kind = _kind(name, data_dir)
    if kind == "synthetic":
        return _synthetic(img_size)
    if kind == "dtd release":
        return _dtd(data_dir, img_size, workers, log)
    if kind == "vtab":
        return _vtab(name, data_dir, img_size, workers, log)
    if kind == "fgvc":
        return _fgvc(name, data_dir, img_size)
    return _folder(name, img_size, workers, log)


def missing(name, data_dir="./data"):
    """Where the files of `name` were looked for, when they are not there; None when they are (or, for
    DTD, can be downloaded). Cheap: it reads no image, so a run can check its data before anything else."""
    kind, needed = _kind(name, data_dir), []
    if kind == "vtab":
        needed = [os.path.join(data_dir, "vtab-1k", name, file) for file in ("train800val200.txt", "test.txt")]
    elif kind == "fgvc":
        needed = [os.path.join(data_dir, "fgvc", FGVC_TASKS[name][0], file) for file in ("train.json", "test.json")]
    elif kind == "folder":
        needed = [os.path.join(name, "train")]
    absent = [path for path in needed if not os.path.exists(path)]
    return os.path.dirname(absent[0]) if absent else None


def is_path(name):
    """Whether --data names a folder rather than a dataset."""
    return os.sep in name or "/" in name or os.path.isdir(name)


def _kind(name, data_dir):
    if name == "synthetic":
        return "synthetic"
    if name == "dtd" and not os.path.isfile(os.path.join(data_dir, "vtab-1k", "dtd", "train800val200.txt")):
        return "dtd release"
    if name in VTAB_TASKS:
        return "vtab"
    if name in FGVC_TASKS:
        return "fgvc"
    if is_path(name):
        return "folder"
    raise DataError(f"unknown dataset {name!r}: choose synthetic, a VTAB-1k task ({', '.join(VTAB_TASKS)}), "
                    f"an FGVC set ({', '.join(FGVC_TASKS)}), a suite ({', '.join(SUITES)}), or a path to a "
                    f"folder with train/ and test/ class subfolders")


# ---- decoding -------------------------------------------------------------------------------------

def _reason(error):
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _open_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises on bad files
        raise DataError(f"cannot decode image {path} ({_reason(e)}): the file is corrupt or not an image; "
                        f"replace it from the original dataset") from None


class _Decode(Dataset):
    """Each path decoded and resized to (3, size, size) uint8, with an error message ('' when fine)."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = _open_rgb(self.paths[index]).resize((self.size, self.size), Image.Resampling.BICUBIC)
        except DataError as e:
            # raised in a worker it would reach the caller buried in a traceback: hand the message back
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(e)
        return pil_to_tensor(image), ""


def _preload(samples, img_size, workers, split, log):
    """Decode and resize every (path, label) once, in `workers` processes: a Preloaded dataset. Large splits
    take minutes (SUN397's test set is 21,750 images), so progress shows on one line of a terminal."""
    paths = [path for path, _ in samples]
    # filled in place rather than torch.cat: the largest VTAB test sets take several GB at 224, held once
    images = torch.empty(len(paths), 3, img_size, img_size, dtype=torch.uint8)
    start, began = 0, time.time()
    show = log is not None and sys.stderr.isatty()
    for batch, errors in DataLoader(_Decode(paths, img_size), batch_size=64, **workers_kw(workers)):
        broken = [error for error in errors if error]
        if broken:
            raise DataError(broken[0])
        images[start:start + len(batch)] = batch
        start += len(batch)
        if show:
            print(f"\rdecoding {split}: {start:,}/{len(paths):,} images, {start / (time.time() - began):.0f} "
                  f"images/s ", end="", file=sys.stderr, flush=True)
    if show:
        print("\r\033[K", end="", file=sys.stderr)  # clear the progress line
    if log is not None:
        seconds = time.time() - began
        log(f"decoded {len(paths):,} {split} images in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.0f} "
            f"images/s)")
    return Preloaded(images, torch.tensor([label for _, label in samples], dtype=torch.int64))


class _OnTheFly(Dataset):
    """(path, label) samples decoded and transformed at every access (random augmentation).

    The random crop and flip of sample i come from a generator seeded with (seed, i): set `seed` once
    an epoch, and every image is augmented the same way whichever worker decodes it, and when, so an
    interrupted run that resumes mid-epoch sees the same images as one that was never stopped."""

    seed = 0

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        # Only the CPU generator, which fork_rng restores: torch.manual_seed would also reseed the CUDA one
        # that dropout draws from, when this runs in the training process (--workers 0).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1_000_003 + index)
            return self.transform(_open_rgb(path)), label


def _validate(samples, source, num_classes):
    """Fail early, in the calling process, on an empty split, a label out of range or a missing image."""
    if not samples:
        raise DataError(f"{source} lists no images")
    bad = next((label for _, label in samples if not 0 <= label < num_classes), None)
    if bad is not None:
        raise DataError(f"{source}: label {bad} is outside 0..{num_classes - 1} (is it the right file?)")
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise DataError(f"image {missing[0]} listed in {source} does not exist ({len(missing)} of "
                        f"{len(samples)} listed images are missing; is the dataset fully extracted?)")


# ---- VTAB-1k --------------------------------------------------------------------------------------

def _read_list(list_file, folder, num_classes):
    """[(folder/path, label)] from lines '<path relative to folder> <label>', checked."""
    if not os.path.isfile(list_file):
        raise DataError(f"{list_file} not found: expected {VTAB_LAYOUT}")
    samples = []
    for number, line in enumerate(_read_lines(list_file), 1):
        if not line.strip():
            continue
        try:
            relative, label = line.strip().rsplit(maxsplit=1)
            samples.append((os.path.join(folder, relative), int(label)))
        except ValueError:
            raise DataError(f"{list_file}, line {number}: expected '<image path> <label>', "
                            f"got {line.strip()!r}") from None
    _validate(samples, list_file, num_classes)
    return samples


def _read_lines(text_file):
    """The lines of a list file, read as UTF-8 whatever the locale."""
    try:
        with open(text_file, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{text_file} is not a UTF-8 text file (byte {e.start} is not UTF-8): is it the list "
                        f"file, and complete? Download or extract it again") from None
    except OSError as e:
        raise DataError(f"cannot read {text_file} ({_reason(e)})") from None


def _vtab(name, data_dir, img_size, workers, log):
    folder = os.path.join(data_dir, "vtab-1k", name)
    train, test = (_read_list(os.path.join(folder, file), folder, VTAB_TASKS[name])
                   for file in ("train800val200.txt", "test.txt"))
    return Task(_preload(train, img_size, workers, "train", log), _preload(test, img_size, workers, "test", log),
                [str(label) for label in range(VTAB_TASKS[name])],
                f"VTAB-1k {name} from {folder}: {len(train)} train (train800val200.txt) / {len(test)} test "
                f"images, resized to {img_size}x{img_size}")


# ---- DTD from torchvision's release ---------------------------------------------------------------

def _download_dtd(data_dir):
    """torchvision fetches and extracts the archive to <data_dir>/dtd/dtd, or finds it already there."""
    url, root = torchvision.datasets.DTD._URL, os.path.join(data_dir, "dtd", "dtd")
    archive = os.path.join(data_dir, "dtd", os.path.basename(url))
    try:
        torchvision.datasets.DTD(data_dir, download=True)
    except Exception as e:  # no network, a proxy's error page, a truncated archive: all leave no data
        raise DataError(f"DTD not found in {root}/images and downloading {url} failed ({_reason(e)}). Without "
                        f"network: download {url} elsewhere and put it at {archive} (it is checked and "
                        f"extracted on the next run), or extract it yourself so that "
                        f"{root}/images/<class>/*.jpg and {root}/labels/train1.txt exist; or place the "
                        f"VTAB-1k lists in {os.path.join(data_dir, 'vtab-1k', 'dtd')}") from None


def _dtd_list(root, split):
    """The 'class/file.jpg' lines of DTD's labels/<split>1.txt (partition 1, as VTAB uses)."""
    list_file = os.path.join(root, "labels", f"{split}1.txt")
    if not os.path.isfile(list_file):
        raise DataError(f"{list_file} not found: {root} is not a complete DTD release (expected "
                        f"images/<class>/*.jpg and labels/{{train,val,test}}1.txt); delete it to download again")
    return list_file, [line.strip() for line in _read_lines(list_file) if line.strip()]


def _tfds_order(names, split):
    """`names` in the order TFDS stores a split: by md5(split name + key), the key being the file name."""
    return sorted(names, key=lambda name: int(hashlib.md5((split + name).encode()).hexdigest(), 16))


def _dtd(data_dir, img_size, workers, log):
    root = os.path.join(data_dir, "dtd", "dtd")
    if not os.path.isdir(root):  # the same test torchvision makes before downloading
        _download_dtd(data_dir)
    lists = {split: _dtd_list(root, split) for split in ("train", "val", "test")}  # split -> (file, names)
    classes = sorted({name.split("/")[0] for _, names in lists.values() for name in names})  # as TFDS, torchvision
    chosen = {"train": _tfds_order(lists["train"][1], "train")[:800],  # VTAB's train[:800]
              "val": _tfds_order(lists["val"][1], "validation")[:200],  # and validation[:200]
              "test": lists["test"][1]}
    samples = {}
    for split, names in chosen.items():
        samples[split] = [(os.path.join(root, "images", name), classes.index(name.split("/")[0]))
                          for name in names]
        _validate(samples[split], lists[split][0], len(classes))
    train, test = samples["train"] + samples["val"], samples["test"]
    return Task(_preload(train, img_size, workers, "train", log), _preload(test, img_size, workers, "test", log),
                classes, f"DTD partition 1 from {root} on the VTAB-1k protocol: {len(train)} train (first 800 of train1 + "
                f"200 of val1 in TFDS order) / {len(test)} test images, {len(classes)} classes, resized to "
                f"{img_size}x{img_size}")


# ---- FGVC (VPT's json splits) ---------------------------------------------------------------------

def _read_json(json_file, image_dir):
    if not os.path.isfile(json_file):
        raise DataError(f"{json_file} not found: expected VPT's FGVC split files {{train,val,test}}.json "
                        f"(https://cornell.box.com/v/vptfgvcsplits) next to the images in {image_dir}")
    try:
        with open(json_file) as f:
            annotations = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{json_file} is not valid json ({_reason(e)}): download it again") from None
    if not isinstance(annotations, dict):
        raise DataError(f"{json_file} should map image paths to class ids")
    return annotations


def _fgvc_transforms(img_size):
    resize = v2.Resize(round(img_size * 256 / 224))  # shorter side; 256 for 224 as VPT and ARC
    return (v2.Compose([resize, v2.RandomCrop(img_size), v2.RandomHorizontalFlip(), v2.PILToTensor()]),
            v2.Compose([resize, v2.CenterCrop(img_size), v2.PILToTensor()]))


def _fgvc(name, data_dir, img_size):
    folder, subfolder, num_classes = FGVC_TASKS[name]
    root = os.path.join(data_dir, "fgvc", folder)
    image_dir = os.path.join(root, subfolder)
    train_file, test_file = os.path.join(root, "train.json"), os.path.join(root, "test.json")
    train, test = _read_json(train_file, image_dir), _read_json(test_file, image_dir)
    index = {class_id: i for i, class_id in enumerate(sorted(set(train.values())))}  # VPT's remapping
    unknown = next((class_id for class_id in test.values() if class_id not in index), None)
    if unknown is not None:
        raise DataError(f"{test_file}: class id {unknown!r} never occurs in {train_file}")
    train_samples, test_samples = ([(os.path.join(image_dir, path), index[class_id])
                                    for path, class_id in annotations.items()] for annotations in (train, test))
    _validate(train_samples, train_file, num_classes)
    _validate(test_samples, test_file, num_classes)
    train_transform, test_transform = _fgvc_transforms(img_size)
    names = [str(class_id) for class_id in index]  # a partial copy of the set may miss some: the head keeps its size
    return Task(_OnTheFly(train_samples, train_transform), _OnTheFly(test_samples, test_transform),
                names + [f"(no images) {i}" for i in range(len(names), num_classes)],
                f"FGVC {folder} from {root} (VPT json): {len(train_samples)} train (train.json) / "
                f"{len(test_samples)} test images, {len(index)} classes, random {img_size} crops + flips for "
                f"training, centre crops for testing")


# ---- an image folder ------------------------------------------------------------------------------

def _scan(split_dir, class_index):
    """[(path, label)] for the images under each class subfolder of split_dir, sorted as ImageFolder does."""
    samples = []
    for entry in sorted(os.scandir(split_dir), key=lambda entry: entry.name):
        if not entry.is_dir():
            continue
        if entry.name not in class_index:
            raise DataError(f"class folder {entry.path} has no counterpart in "
                            f"{os.path.join(os.path.dirname(split_dir), 'train')}: the classes must match")
        for parent, _, files in sorted(os.walk(entry.path, followlinks=True)):
            samples += [(os.path.join(parent, file), class_index[entry.name])
                        for file in sorted(files) if file.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class subfolders of {split_dir}")
    return samples


def _folder(path, img_size, workers, log):
    train_dir = os.path.join(path, "train")
    test_name = "test" if os.path.isdir(os.path.join(path, "test")) else "val"
    test_dir = os.path.join(path, test_name)
    if not os.path.isdir(train_dir) or not os.path.isdir(test_dir):
        raise DataError(f"{path} needs train/ and test/ (or val/) subfolders with one folder of images per "
                        f"class, as torchvision's ImageFolder: e.g. {train_dir}/<class>/xxx.jpg")
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    class_index = {name: i for i, name in enumerate(classes)}
    train, test = _scan(train_dir, class_index), _scan(test_dir, class_index)
    return Task(_preload(train, img_size, workers, "train", log), _preload(test, img_size, workers, test_name, log),
                classes, f"image folder {path}: {len(train)} train / {len(test)} {test_name} images, {len(classes)} "
                f"classes, resized to {img_size}x{img_size}")


# ---- synthetic ------------------------------------------------------------------------------------

def _synthetic_split(per_class, size, generator):
    """Class k: mean colour at angle 2 pi k / 10 on a colour wheel, plus a sinusoidal grating at angle
    pi k / 10 with a random phase, plus pixel noise. The mean colour alone separates the classes, so
    even a head on frozen random features learns them; the grating gives adapters something to find."""
    labels = torch.arange(SYNTHETIC_CLASSES).repeat_interleave(per_class)
    n, k = len(labels), labels.float()
    channel_offsets = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    colour = 0.5 + 0.25 * torch.cos(2 * math.pi * k[:, None] / SYNTHETIC_CLASSES + channel_offsets)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    angle = (math.pi * k / SYNTHETIC_CLASSES)[:, None, None]
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    grating = torch.sin(2 * math.pi * 4 * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
    images = colour[:, :, None, None] + 0.1 * grating[:, None] + 0.05 * torch.randn(n, 3, size, size,
                                                                                  generator=generator)
    return Preloaded((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)


def _synthetic(img_size):
    generator = torch.Generator().manual_seed(0)
    train = _synthetic_split(SYNTHETIC_TRAIN, img_size, generator)
    test = _synthetic_split(SYNTHETIC_TEST, img_size, generator)
    return Task(train, test, [f"class {k}" for k in range(SYNTHETIC_CLASSES)],
                f"synthetic: {SYNTHETIC_CLASSES} classes of coloured oriented gratings, {len(train)} train / "
                f"{len(test)} test images at {img_size}x{img_size} (seed 0)")
