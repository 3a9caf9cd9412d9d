"""Tests of data.py: every reader on small datasets written under tmp_path in the layouts that
people keep them in, odd and hostile files, the crops, and the loader.
"""

import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
from conftest import (
    GOOD_IMAGES,
    HERE,
    IMG_SIZE,
    fgvc_cars,
    fgvc_pictures,
    metrics,
    run_train,
    write_dtd_release,
    write_image,
    write_image_folder,
    write_list,
    write_vtab_with_broken_images,
)


def image_ident(image):
    """The ident of an image written by write_image, from its uint8 (3, H, W) tensor."""
    digits = ((image.float().mean((1, 2)) - 4) / 8).round().long().tolist()
    return sum(d * 32**c for c, d in enumerate(digits))


def dataset_idents(dataset):
    return [image_ident(dataset[i][0]) for i in range(len(dataset))]


def dataset_labels(dataset):
    return [dataset[i][1] for i in range(len(dataset))]


def write_vtab(root, train, test, task="eurosat"):
    """A VTAB-1k task folder in NOAH's layout; train/test: [(ident, label)]; returns the folder."""
    folder = root / "vtab-1k" / task
    for split, samples in (("train800val200", train), ("test", test)):
        for ident, _ in samples:
            write_image(folder / "images" / split / f"{ident:06d}.jpg", ident)
        write_list(
            folder / f"{split}.txt", [f"images/{split}/{i:06d}.jpg {label}" for i, label in samples]
        )
    return folder


def tfds_first(names, split, n):
    return sorted(names, key=lambda name: hashlib.md5(split.encode() + name.encode()).digest())[:n]


def build_error(match, *args, **kw):
    with pytest.raises(data.DataError, match=match) as info:
        data.build(*args, img_size=IMG_SIZE, **kw)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    return str(info.value)


def test_data_synthetic_is_balanced_deterministic_uint8():
    task = data.build("synthetic", img_size=IMG_SIZE)
    assert isinstance(task.train, data.Preloaded) and isinstance(task.test, data.Preloaded)
    assert (
        task.train.images.shape == (500, 3, IMG_SIZE, IMG_SIZE)
        and task.train.images.dtype == torch.uint8
    )
    assert task.test.images.shape == (200, 3, IMG_SIZE, IMG_SIZE)
    assert task.train.labels.dtype == torch.int64 and task.num_classes == 10
    assert torch.bincount(task.train.labels).tolist() == [50] * 10
    assert torch.bincount(task.test.labels).tolist() == [20] * 10
    again = data.build("synthetic", img_size=IMG_SIZE)
    assert torch.equal(again.train.images, task.train.images) and torch.equal(
        again.test.images, task.test.images
    )
    image, label = task.train[0]
    assert image.shape == (3, IMG_SIZE, IMG_SIZE) and isinstance(label, int)
    # classes differ in mean colour, so even a linear head on raw statistics separates them
    means = torch.stack(
        [task.train.images[task.train.labels == k].float().mean((0, 2, 3)) for k in range(10)]
    )
    assert torch.cdist(means, means).add(torch.eye(10) * 1e3).min() > 20


@pytest.mark.parametrize("workers", [0, 2])
def test_data_vtab_lists_give_images_and_labels(tmp_path, workers):
    train, test = [(0, 3), (1, 0), (2, 9), (3, 3)], [(10, 1), (11, 7)]
    write_vtab(tmp_path, train, test)
    task = data.build("eurosat", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=workers)
    assert task.num_classes == 10 and isinstance(task.train, data.Preloaded)
    assert task.train.images.shape == (4, 3, IMG_SIZE, IMG_SIZE)
    for dataset, samples in ((task.train, train), (task.test, test)):
        assert list(zip(dataset_idents(dataset), dataset_labels(dataset), strict=True)) == samples
    assert "eurosat" in task.description and "4 train" in task.description


def test_data_dtd_lists_win_over_torchvision(tmp_path):
    write_vtab(tmp_path, [(0, 46), (1, 2)], [(2, 5)], task="dtd")
    task = data.build("dtd", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0)
    assert (
        task.num_classes == 47
        and dataset_labels(task.train) == [46, 2]
        and "VTAB-1k lists" in task.description
        and os.path.join(str(tmp_path), "vtab-1k", "dtd") in task.description
    )


def test_data_dtd_torchvision_release_on_the_vtab_protocol(tmp_path):
    classes = ["zigzagged", "banded", "meshed", "dotted", "lined"]  # created out of order
    names, idents = write_dtd_release(tmp_path, classes, counts=(180, 50, 4))
    task = data.build("dtd", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=2)
    expected = tfds_first(names["train"], "train", 800) + tfds_first(
        names["val"], "validation", 200
    )
    assert dataset_idents(task.train) == [idents[name] for name in expected]
    order = sorted(classes)  # torchvision's and TFDS's class indices
    assert dataset_labels(task.train) == [order.index(name.split("/")[0]) for name in expected]
    assert set(dataset_labels(task.train)) == set(
        range(5)
    )  # the first 800 lines would miss a class
    test = tfds_first(names["test"], "test", len(names["test"]))  # all of test1, in TFDS order
    assert dataset_idents(task.test) == [idents[name] for name in test]
    assert dataset_labels(task.test) == [order.index(name.split("/")[0]) for name in test]
    assert (
        task.num_classes == 5 and "1000 train" in task.description and "20 test" in task.description
    )


def test_data_dtd_download_failure_says_where_and_how(tmp_path, monkeypatch):
    def no_network(*args, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(
        urllib.request, "urlopen", no_network
    )  # what torchvision's download goes through
    message = build_error("DTD not found", "dtd", data_dir=str(tmp_path))
    url = torchvision.datasets.DTD._URL
    assert url in message and "no network" in message
    assert os.path.join(str(tmp_path), "dtd", "dtd", "images") in message
    assert os.path.join(str(tmp_path), "dtd", os.path.basename(url)) in message


def test_data_dtd_archive_placed_by_hand_needs_no_network(tmp_path, monkeypatch):
    source = tmp_path / "source"
    names, idents = write_dtd_release(source, ["banded", "woven"], counts=(3, 2, 2))
    archive = tmp_path / "data" / "dtd" / os.path.basename(torchvision.datasets.DTD._URL)
    os.makedirs(archive.parent)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(
            source / "dtd" / "dtd", arcname="dtd"
        )  # the release unpacks to dtd/{images,labels,imdb}
    monkeypatch.setattr(
        torchvision.datasets.DTD, "_MD5", hashlib.md5(archive.read_bytes()).hexdigest()
    )

    def no_network(*args, **kw):
        raise AssertionError("tried the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    task = data.build("dtd", data_dir=str(tmp_path / "data"), img_size=IMG_SIZE, workers=0)
    test = tfds_first(names["test"], "test", len(names["test"]))
    assert len(task.train) == 10 and dataset_idents(task.test) == [idents[name] for name in test]


@pytest.mark.parametrize("name", list(data.FGVC_TASKS))
def test_data_fgvc_json_remaps_ids_and_finds_the_image_folder(tmp_path, name):
    (folder, *_), subfolder, num_classes = data.FGVC_TASKS[name]
    root = tmp_path / "fgvc" / folder
    train = {"a/1.jpg": 17, "a/2.jpg": 5, "b/3.jpg": 9, "b/4.jpg": 17}
    test = {"c/5.jpg": 9, "c/6.jpg": 5}
    for ident, path in enumerate([*train, *test]):
        write_image(root / subfolder / path, ident)
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    task = data.build(name, data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0)
    assert task.num_classes == num_classes and folder in task.description
    assert dataset_labels(task.train) == [2, 0, 1, 2] and dataset_labels(task.test) == [
        1,
        0,
    ]  # 5, 9, 17 -> 0, 1, 2
    assert dataset_idents(task.train) == [0, 1, 2, 3] and dataset_idents(task.test) == [4, 5]
    images, labels = next(
        data.Loader(task.train, torch.device("cpu"))([torch.tensor([3, 0, 2])], seed=0)
    )
    assert images.dtype == torch.uint8 and images.shape == (3, 3, IMG_SIZE, IMG_SIZE)
    assert [image_ident(image) for image in images] == [3, 0, 2] and labels.tolist() == [2, 2, 1]
    assert isinstance(task.test, data.Preloaded) and task.test.images.shape == (
        2,
        3,
        IMG_SIZE,
        IMG_SIZE,
    )


def test_data_fgvc_random_crops_are_torchvision_s_crops_of_the_resized_images(tmp_path):
    from torchvision.transforms.v2 import functional as F

    task, pictures = fgvc_pictures(tmp_path)
    resized = [
        F.pil_to_tensor(F.resize(picture, [round(IMG_SIZE * 256 / 224)])) for picture in pictures
    ]
    assert isinstance(task.train, data.Resized)
    assert all(
        torch.equal(task.train[k][0], image) for k, image in enumerate(resized)
    )  # decoded once, as Resize
    generator = torch.Generator().manual_seed(0)
    for _ in range(
        10
    ):  # draws at random, and the corners: every (top, left, flip) is torchvision's crop
        room = task.train.shapes - IMG_SIZE + 1
        tops, lefts = (torch.rand(len(resized), 2, generator=generator) * room).long().unbind(1)
        crops = (tops, lefts, torch.rand(len(resized), generator=generator) < 0.5)
        for corner in (
            crops,
            (room[:, 0] - 1, room[:, 1] - 1, ~crops[2]),
            (0 * tops, 0 * lefts, crops[2]),
        ):
            index = torch.tensor(
                [4, 0, 3, 1, 2]
            )  # any order: each image at its own offset in the buffer
            batch = task.train.batch(index, corner)
            for image, k in zip(batch, index.tolist(), strict=True):
                top, left, flip = (int(t[k]) for t in corner)
                expected = F.crop(resized[k], top, left, IMG_SIZE, IMG_SIZE)
                assert torch.equal(image, F.horizontal_flip(expected) if flip else expected)
    loader = data.Loader(
        task.train, torch.device("cpu")
    )  # the Loader crops as the epoch's draw says
    images, labels = next(loader([torch.arange(5)], seed=7))
    assert torch.equal(images, task.train.batch(torch.arange(5), task.train.crops(7)))
    assert labels.tolist() == [0, 1, 0, 1, 0]


def test_data_fgvc_crops_depend_on_the_seed_and_the_image_alone(tmp_path):
    task, _ = fgvc_pictures(tmp_path)
    loader = data.Loader(task.train, torch.device("cpu"))

    def epoch(seed, batches):
        images = torch.cat([images for images, _ in loader(batches, seed)])
        return dict(zip(torch.cat(batches).tolist(), images, strict=True))

    first = epoch(3, [torch.tensor([0, 1, 2]), torch.tensor([3, 4])])
    again = epoch(
        3, [torch.tensor([4, 2]), torch.tensor([1]), torch.tensor([3, 0])]
    )  # other batches, other order
    assert all(
        torch.equal(first[k], again[k]) for k in range(5)
    )  # a resumed or distributed run sees the same
    tops, lefts, flips = map(
        torch.stack, zip(*(task.train.crops(seed) for seed in range(40)), strict=True)
    )
    assert not torch.equal(tops, tops[:1].expand_as(tops)) and not torch.equal(
        lefts, lefts[:1].expand_as(lefts)
    )
    assert 0 < flips.float().mean() < 1  # another epoch, other crops and flips
    assert (tops >= 0).all() and (tops <= task.train.shapes[:, 0] - IMG_SIZE).all()
    assert (lefts >= 0).all() and (lefts <= task.train.shapes[:, 1] - IMG_SIZE).all()
    later = epoch(4, [torch.arange(5)])
    assert any(not torch.equal(first[k], later[k]) for k in range(5))


def test_fgvc_augmentation_never_reseeds_the_generators_dropout_draws_from(tmp_path, monkeypatch):
    # the crops are drawn in the training process: reseeding CUDA there would reset the dropout
    # stream on a GPU every epoch, and drawing from the global generators would shift it
    fgvc_cars(tmp_path, 8)
    task = data.build("cars", str(tmp_path), 16, workers=0, log=None)
    calls = []
    for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, name=name: calls.append(name))
    monkeypatch.setattr(torch, "manual_seed", lambda *args: calls.append("torch.manual_seed"))
    dropout_stream = torch.get_rng_state()
    loader = data.Loader(task.train, torch.device("cpu"))
    crops = [images for images, _ in loader([torch.arange(4), torch.arange(4, 8)], seed=11)]
    assert calls == [] and torch.equal(torch.get_rng_state(), dropout_stream)
    again = [images for images, _ in loader([torch.arange(4), torch.arange(4, 8)], seed=11)]
    assert all(
        torch.equal(a, b) for a, b in zip(crops, again, strict=True)
    )  # a function of (seed, image)


def test_data_a_loader_asks_whether_its_split_fits_on_the_device(tmp_path, monkeypatch):
    # with the split's size; what follows (the split kept in host memory, and its batches bitwise
    # the device path's) needs a GPU:
    # test_cuda_a_split_kept_in_host_memory_gives_the_device_path_s_batches_bitwise
    task, _ = fgvc_pictures(tmp_path)
    asked = []
    monkeypatch.setattr(
        data, "fits_on_device", lambda nbytes, device: asked.append(nbytes) or False
    )
    for split in (task.train, task.test):
        data.Loader(split, torch.device("cpu"))
    assert asked == [task.train.pixels.numel(), task.test.images.numel()]


def test_a_process_with_no_test_images_gets_no_batches():
    loader = data.Loader(data.build("synthetic", img_size=16, log=None).test, torch.device("cpu"))
    assert list(loader([])) == []


def test_data_image_folder(tmp_path):
    for split, ident in (("train", 0), ("val", 10)):
        for k, cls in enumerate(["dog", "cat"]):
            write_image(tmp_path / "pets" / split / cls / f"{k}.jpg", ident + k)
    task = data.build(str(tmp_path / "pets"), img_size=IMG_SIZE, workers=0)
    assert task.num_classes == 2  # and the test split is val/ (idents 10, 11) when test/ is absent
    assert dataset_labels(task.train) == [0, 1] and dataset_idents(task.train) == [
        1,
        0,
    ]  # cat = 0, dog = 1
    assert dataset_labels(task.test) == [0, 1] and dataset_idents(task.test) == [11, 10]
    write_image(tmp_path / "pets" / "test" / "cow" / "0.jpg", 20)  # test/ is preferred to val/
    build_error("cow has no counterpart", str(tmp_path / "pets"))
    build_error("needs train/ and test/", str(tmp_path / "nothing") + os.sep)


def test_data_unknown_name_lists_the_choices():
    message = build_error("unknown dataset 'imagenet'", "imagenet")
    assert all(
        choice in message
        for choice in ["synthetic", "cifar", "dsprites_ori", "cub", "cars", "path"]
    )


def test_data_missing_dataset_folders_list_every_place_tried(tmp_path):
    message = build_error("none of", "cifar", data_dir=str(tmp_path))
    places = ["vtab-1k/cifar", "cifar", "vtab-1k/cifar100", "cifar100"]
    tried = ", ".join(os.path.join(str(tmp_path), place) for place in places)
    assert f"none of {tried} holds train800val200.txt; " in message
    assert "relative to the task folder" in message
    message = build_error("none of", "cub", data_dir=str(tmp_path))
    places = ["fgvc/CUB_200_2011", "fgvc/CUB", "CUB_200_2011", "CUB"]
    tried = ", ".join(os.path.join(str(tmp_path), place) for place in places)
    assert f"none of {tried} holds train.json; " in message and "VPT's split files" in message
    # what a suite reports before it starts: the first place, the layout of NOAH and VPT
    assert data.missing("cub", str(tmp_path)) == os.path.join(
        str(tmp_path), "fgvc", "CUB_200_2011", "train.json"
    )
    os.makedirs(tmp_path / "dtd" / "dtd" / "images")  # a half-extracted release
    build_error(r"labels.train1\.txt is missing", "dtd", data_dir=str(tmp_path))


def test_data_missing_names_the_missing_file_of_every_layout(tmp_path):
    """data.missing names the file (not the folder that holds it) for every layout, and build()
    fails on that same file: both read one description of each layout."""
    vtab = write_vtab(tmp_path, [(0, 1)], [(1, 2)], task="kitti")
    os.remove(vtab / "test.txt")
    fgvc = tmp_path / "fgvc" / "NABirds"
    os.makedirs(fgvc)
    (fgvc / "train.json").write_text("{}")
    release = tmp_path / "dtd" / "dtd"
    write_list(release / "labels" / "train1.txt", ["banded/banded_0001.jpg"])
    pets = tmp_path / "pets"
    write_image(pets / "train" / "cat" / "0.jpg", 0)
    for name, absent, kind in (
        ("kitti", vtab / "test.txt", "vtab"),
        ("nabirds", fgvc / "test.json", "fgvc"),
        ("dtd", release / "labels" / "val1.txt", "dtd release"),
        (str(pets), pets / "test", "folder"),
    ):
        assert data.missing(name, str(tmp_path)) == str(absent)
        message = build_error("is missing", name, data_dir=str(tmp_path))
        assert message.startswith(f"no {name} data: {absent} is missing; ")
        assert message.endswith(data.LAYOUTS[kind])  # what the layout should be
    (pets / "val").mkdir()  # val/ stands for test/ when test/ is absent
    assert data.missing(str(pets), str(tmp_path)) is None
    assert data.missing("synthetic", str(tmp_path)) is None
    shutil.rmtree(release.parent)
    assert data.missing("dtd", str(tmp_path)) is None  # no release folder: build() downloads it


@pytest.mark.parametrize("workers", [0, 2])
def test_data_missing_and_corrupt_images_are_named(tmp_path, workers):
    folder = write_vtab(tmp_path, [(0, 1), (1, 2)], [(2, 3)])
    os.remove(folder / "images" / "test" / "000002.jpg")
    message = build_error("does not exist", "eurosat", data_dir=str(tmp_path), workers=workers)
    assert (
        os.path.join(str(folder), "images/test/000002.jpg") in message
        and str(folder / "test.txt") in message
    )

    write_image(folder / "images" / "test" / "000002.jpg", 2)
    (folder / "images" / "train800val200" / "000001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    message = build_error("cannot decode image", "eurosat", data_dir=str(tmp_path), workers=workers)
    assert os.path.join(str(folder), "images/train800val200/000001.jpg") in message


def test_data_broken_lists_are_reported(tmp_path):
    folder = write_vtab(tmp_path, [(0, 1)], [(1, 10)])
    build_error(r"test\.txt: label 10 is outside 0\.\.9", "eurosat", data_dir=str(tmp_path))
    write_list(folder / "test.txt", ["images/test/000001.jpg"])
    build_error(
        r"test\.txt, line 1: expected '<image path> <label>'", "eurosat", data_dir=str(tmp_path)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_data_fgvc_corrupt_image_named_at_build_time(tmp_path, workers):
    root = tmp_path / "fgvc" / "OxfordFlowers"
    os.makedirs(root)
    (root / "bad.jpg").write_bytes(b"garbage")
    (root / "train.json").write_text(json.dumps({"bad.jpg": 3}))
    (root / "test.json").write_text(json.dumps({"bad.jpg": 3}))
    # decoded once when the task is built, in worker processes or not: one line that names the file
    message = build_error("cannot decode image", "flowers", data_dir=str(tmp_path), workers=workers)
    assert str(root / "bad.jpg") in message


def test_data_transforms_match_the_official_torchvision_ones(tmp_path):
    """VTAB: Resize((s, s)) bicubic on PIL images; FGVC test: Resize(s * 256/224) + CenterCrop(s) on
    PIL."""
    from torchvision import transforms as v1

    picture = Image.frombytes("RGB", (20, 15), bytes(range(256)) * 3 + bytes(132))
    picture.save(tmp_path / "p.png")
    write_list(tmp_path / "vtab-1k" / "svhn" / "train800val200.txt", ["../../p.png 4"])
    write_list(tmp_path / "vtab-1k" / "svhn" / "test.txt", ["../../p.png 5"])
    vtab = data.build("svhn", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0)
    official = v1.Compose(
        [
            v1.Resize((IMG_SIZE, IMG_SIZE), interpolation=v1.InterpolationMode.BICUBIC),
            v1.PILToTensor(),
        ]
    )
    assert torch.equal(vtab.train[0][0], official(picture))
    os.makedirs(tmp_path / "fgvc" / "StanfordCars")
    picture.save(tmp_path / "fgvc" / "StanfordCars" / "p.png")
    for split in ("train", "test"):
        (tmp_path / "fgvc" / "StanfordCars" / f"{split}.json").write_text(json.dumps({"p.png": 1}))
    fgvc = data.build("cars", data_dir=str(tmp_path), img_size=IMG_SIZE)
    official = v1.Compose(
        [v1.Resize(round(IMG_SIZE * 256 / 224)), v1.CenterCrop(IMG_SIZE), v1.PILToTensor()]
    )
    assert torch.equal(fgvc.test[0][0], official(picture))


def test_the_log_says_where_the_data_was_read_and_how_fast_it_decoded(tmp_path, capsys):
    # library code does not print: what it has to say goes through `log`, one line per split
    folder = write_vtab_with_broken_images(tmp_path / "data", GOOD_IMAGES * 20, GOOD_IMAGES)
    lines = []
    data.build("eurosat", str(tmp_path / "data"), 16, 0, lines.append)
    assert capsys.readouterr() == ("", "")
    assert lines[0] == f"eurosat: reading {folder}" and len(lines) == 3
    assert lines[1].startswith("decoded 80 train images in") and lines[1].endswith("images/s)")
    assert lines[2].startswith("decoded 4 test images in") and lines[2].endswith("images/s)")


def test_data_a_split_fits_on_the_gpu_in_half_of_what_is_free_and_cached(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**30, 80 * 2**30))
    monkeypatch.setattr(
        torch.cuda, "memory_reserved", lambda device=None: 5 * 2**30
    )  # 2 GiB of it cached, unused
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * 2**30)
    assert data.fits_on_device(4 * 2**30, torch.device("cuda")) and not data.fits_on_device(
        4 * 2**30 + 1, torch.device("cuda")
    )
    assert data.fits_on_device(2**50, torch.device("cpu"))  # host memory holds anything


# ------------------------------------------------------------------------------------------------
# Data as people have it (issue 28): the places and folder names of NOAH, RepAdapter, the official
# ARC scripts, V-PETL Bench and VPT, the first place that holds a task winning


def trains_one_epoch(task_name, data_dir, out):
    """train.py runs one epoch from the data where it was found (a tiny ViT, 16 px)."""
    options = ["--model", "vit_t16", "--weights", "none", "--img-size", "16", "--epochs", "1"]
    options += ["--warmup-epochs", "0", "--workers", "0", "--out", out]
    assert run_train("--data", task_name, "--data-dir", data_dir, *options) == 0
    return [m["epoch"] for m in metrics(out)] == [1]


def image_folder_log(task_name, data_dir):
    """data.build's task and its log lines."""
    lines = []
    task = data.build(
        task_name, data_dir=str(data_dir), img_size=IMG_SIZE, workers=0, log=lines.append
    )
    return task, lines


@pytest.mark.parametrize(
    "task_name, place",
    [
        ("eurosat", "vtab-1k/eurosat"),  # NOAH, SSF
        ("eurosat", "eurosat"),  # RepAdapter, the official ARC scripts
        ("cifar", "vtab-1k/cifar"),
        ("cifar", "cifar"),
        ("cifar", "vtab-1k/cifar100"),  # V-PETL Bench
        ("cifar", "cifar100"),
    ],
)
def test_vtab_is_found_in_each_place_people_keep_it(tmp_path, task_name, place):
    train, test = [(0, 3), (1, 0), (2, 9)], [(10, 1), (11, 7)]
    folder = write_vtab(tmp_path / "source", train, test, task="task")
    os.makedirs(os.path.dirname(tmp_path / "data" / place), exist_ok=True)
    shutil.move(folder, tmp_path / "data" / place)
    assert data.missing(task_name, str(tmp_path / "data")) is None
    task, lines = image_folder_log(task_name, tmp_path / "data")
    assert task.num_classes == data.VTAB_TASKS[task_name]
    for dataset, samples in ((task.train, train), (task.test, test)):
        assert list(zip(dataset_idents(dataset), dataset_labels(dataset), strict=True)) == samples
    assert lines[0] == f"{task_name}: reading {tmp_path / 'data' / place}"
    assert trains_one_epoch(task_name, tmp_path / "data", tmp_path / "run")


def test_the_first_place_that_holds_a_task_wins_and_the_log_says_which(tmp_path):
    first = write_vtab(tmp_path / "data", [(0, 1)], [(1, 2)], task="cifar")  # vtab-1k/cifar
    later = write_vtab(tmp_path / "other", [(5, 6)], [(7, 8)], task="cifar100")
    shutil.move(later, tmp_path / "data" / "cifar100")
    os.makedirs(tmp_path / "data" / "cifar")  # a folder without the lists holds nothing
    task, lines = image_folder_log("cifar", tmp_path / "data")
    assert dataset_idents(task.train) == [0] and dataset_idents(task.test) == [1]
    assert lines[0] == (
        f"cifar: reading {first}; also found in {tmp_path / 'data' / 'cifar100'}, not read"
    )
    shutil.rmtree(first)  # now the next place is read
    task, lines = image_folder_log("cifar", tmp_path / "data")
    assert dataset_idents(task.train) == [5] and lines[0].endswith("cifar100")


FGVC_PLACES = [  # (name, the set's folder under the data folder, its image folder)
    ("cub", "fgvc/CUB_200_2011", "images"),  # VPT, the official ARC code, V-PETL Bench
    ("cub", "CUB", "images"),
    ("nabirds", "fgvc/NABirds", "images"),  # the official ARC code
    ("nabirds", "nabirds", "images"),  # VPT, V-PETL Bench
    ("flowers", "OxfordFlowers", ""),  # VPT, the official ARC code
    ("flowers", "fgvc/OxfordFlower", ""),  # V-PETL Bench
    ("dogs", "fgvc/StanfordDogs", "Images"),  # VPT, V-PETL Bench
    ("dogs", "StanfordDogs", ""),  # the official ARC code: the images at the set's root
    ("cars", "StanfordCars", ""),
]


@pytest.mark.parametrize("name, place, image_folder", FGVC_PLACES)
def test_fgvc_is_found_under_each_repository_s_names(tmp_path, name, place, image_folder):
    root = tmp_path / "data" / place
    train = {"n01-a/1.jpg": 17, "n01-a/2.jpg": 5, "n02-b/3.jpg": 9}
    test = {"n03-c/4.jpg": 9}
    for ident, path in enumerate([*train, *test]):
        write_image(root / image_folder / path, ident)
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    task, lines = image_folder_log(name, tmp_path / "data")
    assert lines[0] == f"{name}: reading {root}"
    assert dataset_idents(task.train) == [0, 1, 2] and dataset_labels(task.train) == [2, 0, 1]
    assert dataset_idents(task.test) == [3] and dataset_labels(task.test) == [1]
    assert task.num_classes == data.FGVC_TASKS[name][2]
    assert trains_one_epoch(name, tmp_path / "data", tmp_path / "run")


def test_a_json_list_naming_a_missing_image_names_both(tmp_path):
    root = tmp_path / "StanfordCars"
    write_image(root / "a.jpg", 0)
    (root / "train.json").write_text(json.dumps({"a.jpg": 1, "gone/b.jpg": 2, "gone/c.jpg": 2}))
    (root / "test.json").write_text(json.dumps({"a.jpg": 1}))
    message = build_error("does not exist", "cars", data_dir=str(tmp_path))
    assert (
        message == f"image {root / 'gone' / 'b.jpg'} listed in {root / 'train.json'} does not exist"
    )


def test_one_epoch_trains_from_the_official_arc_layout(tmp_path, capsys):
    # the official ARC code keeps the FGVC sets right under its data path, without fgvc/
    args = fgvc_cars(tmp_path, 8)
    shutil.move(tmp_path / "fgvc" / "StanfordCars", tmp_path / "StanfordCars")
    os.rmdir(tmp_path / "fgvc")
    out = tmp_path / "run"
    assert run_train(*args, "--epochs", "1", "--workers", "2", "--out", out) == 0
    assert f"cars: reading {tmp_path / 'StanfordCars'}" in capsys.readouterr().out
    assert [m["epoch"] for m in metrics(out)] == [1]


# ------------------------------------------------------------------------------------------------
# Odd and hostile files (issue 30): a correct result or one clear line, never a hang


def write_picture(path, picture):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture.save(path)


def reopened(picture, image_format):
    """`picture` as PIL reads it back from a file of `image_format`."""
    buffer = io.BytesIO()
    picture.save(buffer, image_format)
    buffer.seek(0)
    return Image.open(buffer)


GREYS = np.add.outer(np.arange(16) * 9, np.arange(16) * 7).astype(np.uint8)  # 16x16, 0..240
PALETTE = Image.fromarray(GREYS).convert("P")
PALETTE.info["transparency"] = 0
MODES = {  # a picture of GREYS in each mode, and the error JPEG allows
    "16-bit PNG (I;16)": (reopened(Image.fromarray(GREYS.astype(np.uint16) * 257), "PNG"), 0),
    "32-bit TIFF (I)": (reopened(Image.fromarray(GREYS.astype(np.int32) * 257, "I"), "TIFF"), 0),
    "float TIFF (F)": (reopened(Image.fromarray(GREYS.astype(np.float32)), "TIFF"), 0),
    "grey and alpha (LA)": (Image.fromarray(np.stack([GREYS, 255 - GREYS], -1), "LA"), 0),
    "palette with transparency (P)": (reopened(PALETTE, "PNG"), 0),
    "CMYK JPEG": (reopened(Image.fromarray(GREYS).convert("CMYK"), "JPEG"), 3),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_an_image_of_any_mode_decodes_as_its_8_bit_picture(tmp_path, mode):
    picture, tolerance = MODES[mode]
    extension = {"PNG": "png", "TIFF": "tif", "JPEG": "jpg"}.get(picture.format, "png")
    write_picture(tmp_path / "set" / "train" / "a" / f"0.{extension}", picture)
    write_picture(tmp_path / "set" / "test" / "a" / "0.png", Image.fromarray(GREYS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns of palettes with a transparency it drops
        task = data.build(str(tmp_path / "set"), img_size=16, workers=0, log=None)
    decoded = task.train[0][0].int()
    expected = task.test[0][0].int()  # the 8-bit picture, decoded the same way
    assert decoded.shape == (3, 16, 16) and (decoded - expected).abs().max() <= tolerance


def test_16_bit_greys_use_their_whole_range(tmp_path):
    # 16-bit values above 255 were clipped to white: these would all be 255
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    write_picture(tmp_path / "set" / "train" / "a" / "0.png", Image.fromarray(values))
    write_picture(tmp_path / "set" / "test" / "a" / "0.png", Image.fromarray(values))
    task = data.build(str(tmp_path / "set"), img_size=4, workers=0, log=None)
    assert task.train.images[0, :, 0].tolist() == [[0, 64, 128, 255]] * 3
    # a PNG of another mode than RGB; PIL's mode for 16-bit greys
    assert Image.open(tmp_path / "set" / "train" / "a" / "0.png").mode == "I;16"


def make_unreadable(path):
    """chmod 000 `path`, or skip the test where that leaves it readable (as root)."""
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        os.chmod(path, 0o755)
        pytest.skip("chmod 000 leaves files readable here (root, or root-like capabilities)")


def test_an_unreadable_class_folder_is_an_error_not_an_empty_class(tmp_path):
    for split in ("train", "test"):
        folder = write_image_folder(tmp_path / split / "pets")
        make_unreadable(folder / split / "dog")
        try:
            message = build_error("cannot read the folder", str(folder))
        finally:
            os.chmod(folder / split / "dog", 0o755)
        assert str(folder / split / "dog") in message and "PermissionError" in message


def test_an_unreadable_list_file_is_an_error(tmp_path):
    folder = write_vtab(tmp_path, [(0, 1)], [(1, 2)])
    make_unreadable(folder / "test.txt")
    build_error(f"cannot read {folder / 'test.txt'} .PermissionError", "eurosat", str(tmp_path))
    os.chmod(folder / "test.txt", 0o644)
    root = tmp_path / "fgvc" / "StanfordCars"
    write_image(root / "a.jpg", 0)
    for split in ("train", "test"):
        (root / f"{split}.json").write_text(json.dumps({"a.jpg": 1}))
    make_unreadable(root / "test.json")
    build_error(f"cannot read {root / 'test.json'} .PermissionError", "cars", str(tmp_path))


def test_images_are_told_apart_missing_unreadable_and_damaged(tmp_path):
    folder = write_vtab(tmp_path, [(0, 1), (1, 2)], [(2, 3)])
    image = folder / "images" / "test" / "000002.jpg"
    os.remove(image)
    message = build_error("does not exist", "eurosat", str(tmp_path))
    assert message == f"image {image} listed in {folder / 'test.txt'} does not exist"
    os.mkdir(image)  # a folder where the image should be
    build_error(f"image {image} listed in .* is not a regular file", "eurosat", str(tmp_path))
    os.rmdir(image)
    image.write_bytes(b"\xff\xd8 half a JPEG")
    message = build_error("cannot decode image", "eurosat", str(tmp_path))
    assert str(image) in message and "damaged or not an image" in message
    write_image(image, 2)
    make_unreadable(image)
    message = build_error("is not readable .permission denied", "eurosat", str(tmp_path))
    assert str(image) in message and "corrupt" not in message and "damaged" not in message


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    folder = write_image_folder(tmp_path / "pets")  # 3 images a class
    os.symlink(".", folder / "train" / "cat" / "loop")
    os.symlink("..", folder / "train" / "dog" / "up")  # back to train/, holding dog itself
    task = data.build(str(folder), img_size=IMG_SIZE, workers=0, log=None)
    # dog/up leads back to train/: cat's images are not dog's too
    assert dataset_labels(task.train) == [0, 0, 0, 1, 1, 1]
    assert len(set(dataset_idents(task.train))) == 6


def test_a_link_from_one_class_to_another_or_above_the_split_lists_nothing_twice(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    os.symlink(folder / "train" / "cat", folder / "train" / "dog" / "cats")
    os.symlink(folder, folder / "train" / "cat" / "root")  # above train/: test/ too
    task = data.build(str(folder), img_size=IMG_SIZE, workers=0, log=None)
    assert dataset_labels(task.train) == [0, 0, 0, 1, 1, 1]
    assert len(set(dataset_idents(task.train))) == 6


def test_symlink_loops_do_not_make_the_walk_exponential(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    for name in ("a", "b", "c", "d", "e", "f"):  # followed blindly: 6**depth folders
        os.symlink(".", folder / "train" / "cat" / name)
    began = time.time()
    task = data.build(str(folder), img_size=IMG_SIZE, workers=0, log=None)
    assert len(task.train) == 6 and time.time() - began < 30
    # a link to a folder outside the dataset is followed, once
    write_image(tmp_path / "more" / "4.jpg", 44)
    os.symlink(tmp_path / "more", folder / "train" / "cat" / "more")
    os.symlink(tmp_path / "more", folder / "train" / "cat" / "more again")
    task = data.build(str(folder), img_size=IMG_SIZE, workers=0, log=None)
    assert dataset_idents(task.train).count(44) == 1 and len(task.train) == 7


@pytest.fixture
def no_hang():
    """Fail, rather than hang, a test that runs for more than 60 seconds."""

    def hung(*_):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_is_not_an_image(tmp_path, no_hang):
    folder = write_image_folder(tmp_path / "pets")
    os.mkfifo(folder / "train" / "cat" / "x.jpg")  # opening it would wait for a writer forever
    message = build_error("is not a regular file", str(folder))
    assert str(folder / "train" / "cat" / "x.jpg") in message
    vtab = write_vtab(tmp_path, [(0, 1)], [(1, 2)])
    os.remove(vtab / "images" / "test" / "000001.jpg")
    os.mkfifo(vtab / "images" / "test" / "000001.jpg")
    build_error(
        r"000001\.jpg listed in .*test\.txt is not a regular file", "eurosat", str(tmp_path)
    )


# A script that builds a folder of images slowly (0.2 s an image, on 2 threads), saying on a file
# when the decoding has begun: for the tests of what a signal or the current folder does to it.
CHILD = """
import os, sys, time
sys.path.insert(0, {here!r})
import data

def slow_load(*args, **kw):
    open({began!r}, "a").close()
    time.sleep({pause})
    return load(*args, **kw)

load = data._load
data._load = slow_load
data.build({folder!r}, img_size=16, workers=2, log=None)
print("built")
"""


def start_child(tmp_path, folder, pause):
    script = tmp_path / "child.py"
    os.makedirs(tmp_path, exist_ok=True)
    began = tmp_path / "began"
    code = CHILD.format(here=HERE, began=str(began), pause=pause, folder=str(folder))
    script.write_text(code)
    child = subprocess.Popen(
        [sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return child, began


def wait_until_decoding(child, began):
    deadline = time.time() + 120
    while not began.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()[1].decode()


def descendants(pid):
    """The processes started by process `pid`, and by them, from /proc."""
    children = {}
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_file) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(stat_file.split("/")[2]))
    found = []
    waiting = [pid]
    while waiting:
        for child in children.get(waiting.pop(), []):
            found.append(child)
            waiting.append(child)
    return found


def many_images(root, count=200):
    for i in range(count):
        write_image(root / "train" / f"c{i % 2}" / f"{i}.jpg", i)
    for i in range(2):
        write_image(root / "test" / f"c{i}" / "0.jpg", i)
    return root


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_signalled_build_stops_at_once_and_leaves_no_decoding_process(tmp_path):
    # 200 images at 0.5 s on 2 threads: 50 s if the queued ones were decoded before stopping.
    # One child a signal, all started at once: each costs seconds of imports on a busy CPU.
    folder = many_images(tmp_path / "pets")
    signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT]
    children = [start_child(tmp_path / s.name, folder, pause=0.5) for s in signals]
    for (child, began), signal_number in zip(children, signals, strict=True):
        wait_until_decoding(child, began)
        decoding = descendants(child.pid)  # none: threads decode, in the process itself
        signalled = time.time()
        child.send_signal(signal_number)
        _, errors = child.communicate(timeout=60)
        assert child.returncode == -signal_number and time.time() - signalled < 20
        time.sleep(0.5)
        assert decoding == [] and [pid for pid in decoding if os.path.exists(f"/proc/{pid}")] == []
        if signal_number == signal.SIGINT:  # Ctrl-C: the main thread's traceback alone
            errors = errors.decode()
            assert errors.count("Traceback") == 1, errors
            assert errors.rstrip().endswith("KeyboardInterrupt")


@pytest.mark.parametrize("impostor", ["data/__init__.py", "data.py"])
def test_the_current_folder_s_data_is_never_imported(tmp_path, monkeypatch, impostor):
    # --data-dir is ./data by default, so the folder a run starts from often holds a data/; and
    # where the current folder comes first on sys.path (python -c, a notebook), a worker process
    # that imported this module by its name would import that folder instead
    cwd = tmp_path / "cwd"
    os.makedirs(os.path.dirname(cwd / impostor), exist_ok=True)
    (cwd / impostor).write_text("raise SystemExit('the current folder was imported')\n")
    folder = write_image_folder(tmp_path / "pets")
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend("")
    task = data.build(str(folder), img_size=IMG_SIZE, workers=2, log=None)
    assert len(task.train) == 6 and len(task.test) == 6


def test_decoding_needs_no_shared_memory(tmp_path):
    # Docker gives containers a 64 MB /dev/shm; here 1 MB, for 200 images of 3x64x64 (2.5 MB)
    folder = many_images(tmp_path / "pets")
    script = (
        f"import sys; sys.path.insert(0, {HERE!r}); import data; "
        f"task = data.build({str(folder)!r}, img_size=64, workers=2, log=None); "
        f"print(len(task.train))"
    )
    mount = 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"'
    command = ["unshare", "--mount", "sh", "-c", mount, "sh", sys.executable, "-c", script]
    try:
        done = subprocess.run(command, capture_output=True, timeout=180)
    except FileNotFoundError:
        pytest.skip("needs unshare (util-linux)")
    if b"Operation not permitted" in done.stderr or b"mount:" in done.stderr:
        pytest.skip(f"no mount namespace here: {done.stderr.decode().strip()}")
    assert done.returncode == 0 and done.stdout == b"200\n", done.stderr.decode()
