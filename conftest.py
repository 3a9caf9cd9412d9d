"""Shared helpers and fixtures of the tests: tiny models, weight files written in the published
layouts, images and datasets on disk, and quick in-process runs of train.py.
"""

import contextlib
import hashlib
import json
import os
import pickle
import re
import signal
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import arc
import data
import swin
import train
import vit

# --------------------------------------------------------------------------------------------------
# Shared fixtures and helpers: tiny models, weight files, images and datasets on disk, quick runs of
# train.py


HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_vit(**kw):
    return vit.VisionTransformer(
        patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, img_size=32, **kw
    )


def randomize_arc(model, seed=0):
    """Give every ARC tensor and the head non-zero values, so folding has something to fold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in arc.arc_state_dict(model).items():
            model.get_parameter(name).copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return model


def swin_tiny(**kw):
    """3 stages at 64 px: 16x16 (shifted 4x4 windows), 8x8 (shifted), 4x4 (one window, no shift)."""
    kw = {"num_classes": 5, "img_size": 64, **kw}
    return swin.SwinTransformer(16, (2, 2, 2), (1, 2, 4), window=4, **kw)


@torch.no_grad()
def randomize_swin(model, which=lambda name: True, std=0.3):
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if which(name):
            p.copy_(
                torch.randn_like(p) * std + (1.0 if re.search(r"norm\d?\.weight$", name) else 0.0)
            )
    return model


def write_google_npz(path, dim, depth, heads, mlp_dim, patch, classes, grid, prefix="", seed=0):
    """A ViT checkpoint in Google's .npz names and layouts (ARC.md section 5), random values."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    head_dim = dim // heads
    arrays = {
        "embedding/kernel": rand(patch, patch, 3, dim),
        "embedding/bias": rand(dim),
        "cls": rand(1, 1, dim),
        "Transformer/posembed_input/pos_embedding": rand(1, 1 + grid * grid, dim),
        "Transformer/encoder_norm/scale": 1 + rand(dim),
        "Transformer/encoder_norm/bias": rand(dim),
        "head/kernel": rand(dim, classes),
        "head/bias": rand(classes),
        "pre_logits/kernel": rand(dim, dim),
        "pre_logits/bias": rand(dim),
    }
    for i in range(depth):
        block, att = (
            f"Transformer/encoderblock_{i}/",
            f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/",
        )
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}{norm}/scale"], arrays[f"{block}{norm}/bias"] = 1 + rand(dim), rand(dim)
        for name in ("query", "key", "value"):
            arrays[f"{att}{name}/kernel"], arrays[f"{att}{name}/bias"] = (
                rand(dim, heads, head_dim),
                rand(heads, head_dim),
            )
        arrays[f"{att}out/kernel"], arrays[f"{att}out/bias"] = rand(heads, head_dim, dim), rand(dim)
        arrays[f"{block}MlpBlock_3/Dense_0/kernel"], arrays[f"{block}MlpBlock_3/Dense_0/bias"] = (
            rand(dim, mlp_dim),
            rand(mlp_dim),
        )
        arrays[f"{block}MlpBlock_3/Dense_1/kernel"], arrays[f"{block}MlpBlock_3/Dense_1/bias"] = (
            rand(mlp_dim, dim),
            rand(dim),
        )
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    return arrays


@pytest.fixture(scope="session")
def vit_b16_npz(tmp_path_factory):
    """Every name and shape of the published imagenet21k/ViT-B_16.npz, pre_logits and 21843-class
    head included."""
    path = tmp_path_factory.mktemp("weights") / "ViT-B_16.npz"
    arrays = write_google_npz(path, 768, 12, 12, 3072, 16, 21843, 14)
    assert arrays[
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    ].shape == (768, 12, 64)
    return path, arrays


def write_first_part(source, target, fraction=0.5):
    """`target`: the first part of `source`, as an interrupted download leaves it."""
    with open(source, "rb") as f:
        content = f.read()
    with open(target, "wb") as f:
        f.write(content[: int(len(content) * fraction)])
    return target


class NotAStateDict:
    """Something torch.save pickles as an object: a weights_only load refuses it."""


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """{name: path} of weight files for --model vit_t16 (img 32): good ones, broken ones, foreign
    ones."""
    folder = tmp_path_factory.mktemp("weight_files")
    paths = {
        name: folder / name
        for name in ("vit_t16.pth", "vit_t16.npz", "vit_s16.pth", "vit_s16.npz", "swin_t.pth")
    }
    torch.save(vit.vit_t16(img_size=32).state_dict(), paths["vit_t16.pth"])
    write_google_npz(paths["vit_t16.npz"], 192, 12, 3, 768, 16, 21843, 14)
    torch.save(vit.vit_s16().state_dict(), paths["vit_s16.pth"])
    write_google_npz(paths["vit_s16.npz"], 384, 12, 6, 1536, 16, 21843, 14)
    torch.save(swin.swin_t(img_size=224).state_dict(), paths["swin_t.pth"])
    # the good files are good: what the broken ones are broken copies of, and the foreign ones load
    # into their own architecture, so a refusal below is about the model, not the file format
    for loader, model, name in (
        (vit.load_pretrained, vit.vit_t16(img_size=32), "vit_t16.pth"),
        (vit.load_pretrained, vit.vit_t16(img_size=32), "vit_t16.npz"),
        (vit.load_pretrained, vit.vit_s16(), "vit_s16.pth"),
        (vit.load_pretrained, vit.vit_s16(), "vit_s16.npz"),
        (swin.load_pretrained, swin.swin_t(img_size=224), "swin_t.pth"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # the 21843-class heads are left out, the grid resized: notes, not faults
            loader(model, paths[name])
    paths["truncated.pth"] = write_first_part(paths["vit_t16.pth"], folder / "truncated.pth")
    paths["truncated.npz"] = write_first_part(paths["vit_t16.npz"], folder / "truncated.npz")
    paths["header_only.npz"] = write_first_part(
        paths["vit_t16.npz"], folder / "header_only.npz", 0.001
    )
    paths["empty.pth"] = folder / "empty.pth"
    paths["empty.pth"].write_bytes(b"")
    for name in ("notes.pth", "notes.npz", "notes.txt"):
        paths[name] = folder / name
        paths[name].write_text("These are my notes, not a checkpoint.\nlr 1e-2, 100 epochs\n")
    paths["whole_model.pth"] = (
        folder / "whole_model.pth"
    )  # torch.save(model) instead of its state_dict()
    torch.save(NotAStateDict(), paths["whole_model.pth"])
    paths["plain_pickle.pth"] = (
        folder / "plain_pickle.pth"
    )  # e.g. a .pkl of another framework's weights
    with open(paths["plain_pickle.pth"], "wb") as f:
        pickle.dump({"blocks.0.norm1.weight": [1.0, 2.0]}, f, protocol=4)
    paths["list.pth"] = folder / "list.pth"  # a torch file, but no state dict
    torch.save([torch.zeros(3)], paths["list.pth"])
    return paths


def write_image(path, ident):
    """An 8x8 solid-colour JPEG whose colour encodes `ident` (< 32**3): three base-32 digits, step
    8."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = tuple(8 * (ident // 32**c % 32) + 4 for c in range(3))
    Image.new("RGB", (8, 8), colour).save(path, quality=100, subsampling=0)


def write_list(list_file, lines):
    os.makedirs(os.path.dirname(list_file), exist_ok=True)
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_dtd_release(root, classes, counts):
    """torchvision's DTD layout under root/dtd/dtd; counts: images per class for train1/val1/test1.
    Lists are sorted by class, as in the release. Returns {split: [names]} and {name: ident}."""
    base = root / "dtd" / "dtd"
    names = {}
    idents = {}
    for split, per_class in zip(("train", "val", "test"), counts, strict=True):
        names[split] = [f"{c}/{c}_{split}_{i:04d}.jpg" for c in classes for i in range(per_class)]
        for name in names[split]:
            idents[name] = len(idents)
            write_image(base / "images" / name, idents[name])
        write_list(base / "labels" / f"{split}1.txt", names[split])
    return names, idents


IMG_SIZE = 32  # img_size of the data tests and of fgvc_pictures


def fgvc_pictures(tmp_path, sizes=((20, 15), (15, 20), (37, 37), (41, 38), (90, 40))):
    """Cars in VPT's layout: textured pictures of the given (width, height), so that every crop and
    flip differs. Returns the task at IMG_SIZE (resized shorter side 37) and the pictures."""
    root = tmp_path / "fgvc" / "StanfordCars"
    os.makedirs(root)
    pictures = [
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8))
        for k, (w, h) in enumerate(sizes)
    ]
    for k, picture in enumerate(pictures):
        picture.save(root / f"{k}.png")
    for split in ("train", "test"):
        (root / f"{split}.json").write_text(
            json.dumps({f"{k}.png": k % 2 for k in range(len(sizes))})
        )
    return data.build(
        "cars", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0, log=None
    ), pictures


def fgvc_cars(root, n_train, n_test=12):
    """A Stanford Cars folder in VPT's json layout: two classes told apart by brightness,
    textured."""
    folder = root / "fgvc" / "StanfordCars"
    train_set = {}
    test_set = {}
    for i in range(n_train + n_test):
        os.makedirs(folder / f"c{i % 2}", exist_ok=True)
        ramp = (
            np.add.outer(np.arange(20), 3 * np.arange(24)) % 50
        )  # texture: crops and flips change pixels
        pixels = np.repeat(((150 if i % 2 else 30) + ramp)[:, :, None], 3, axis=2).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 2}" / f"{i}.png")
        (train_set if i < n_train else test_set)[f"c{i % 2}/{i}.png"] = 100 + i % 2
    (folder / "train.json").write_text(json.dumps(train_set))
    (folder / "test.json").write_text(json.dumps(test_set))
    return [
        "--data",
        "cars",
        "--data-dir",
        str(root),
        "--model",
        "vit_t16",
        "--weights",
        "none",
        "--img-size",
        "16",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "8",
        "--eval-every",
        "1",
    ]


def write_vtab_with_broken_images(data_dir, train_images, test_images, task="eurosat"):
    """A VTAB-1k task in NOAH's layout: images/<split>/<name> for each name given, the lists name
    them all (label = index % 10); names that start with 'missing' are listed but not written, names
    that start with 'corrupt' get garbage bytes. Returns the task folder."""
    folder = os.path.join(data_dir, "vtab-1k", task)
    for split, names in (("train800val200", train_images), ("test", test_images)):
        lines = []
        for i, name in enumerate(names):
            relative = f"images/{split}/{name}"
            path = os.path.join(folder, relative)
            if name.startswith("corrupt"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(b"\x00garbage, not a JPEG\xff" * 8)
            elif not name.startswith("missing"):
                write_image(path, i)
            lines.append(f"{relative} {i % 10}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder


GOOD_IMAGES = [f"{i:06d}.jpg" for i in range(4)]


def write_image_folder(root, classes=("cat", "dog")):
    for split in ("train", "test"):
        for i, label in enumerate(classes):
            for j in range(3):
                write_image(root / split / label / f"{j}.png", 40 * i + j)
    return root


TINY_RUN = [
    "--data",
    "synthetic",
    "--model",
    "vit_t16",
    "--weights",
    "none",
    "--img-size",
    "16",
    "--workers",
    "0",
    "--warmup-epochs",
    "1",
    "--epochs",
    "2",
    "--eval-every",
    "1",
]


@contextlib.contextmanager
def one_thread():
    """torch on one thread for a while: on a shared or busy CPU, two spinning threads make these
    tiny runs ten times slower, one thread never does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_train(*args):
    """train.main in this process; the exit code (0 when it returned)."""
    try:
        with one_thread():
            train.main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return e.code


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trained(path):
    return torch.load(path, weights_only=True)["state_dict"]


def signal_at_step(n, signum=signal.SIGINT):
    """A train.lr_at that sends `signum` to this process at its n-th call: at the n-th training
    step, through train.py's own signal handler, as a Ctrl-C (SIGINT) or a kill (SIGTERM) would."""
    calls = []
    lr_at = train.lr_at

    def signalling(*args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return lr_at(*args)

    return signalling


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "synthetic"
    assert run_train(*TINY_RUN, "--out", out) == 0
    return out


SUITE = [
    "--model",
    "vit_t16",
    "--weights",
    "none",
    "--img-size",
    "16",
    "--epochs",
    "2",
    "--warmup-epochs",
    "0",
    "--workers",
    "0",
]


# A complete run in a few seconds on a CPU: tiny images, synthetic data, a random ViT-T/16, one
# epoch.
QUICK_RUN_OPTIONS = {
    "--data": "synthetic",
    "--model": "vit_t16",
    "--weights": "none",
    "--img-size": "32",
    "--epochs": "1",
    "--warmup-epochs": "0",
    "--workers": "0",
}
RUN_FILES = ("adapters.pth", "metrics.jsonl", "checkpoint.pth", "folded.pth")
# warnings Python's command line does not show by default (outside __main__)
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def quick_run_args(out=None, **options):
    """train.py's argv: the quick run above with `options` changed (data_dir="x" -> --data-dir x;
    None drops an option), and --out `out` when given."""
    args = dict(QUICK_RUN_OPTIONS)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            args.pop(flag, None)
        else:
            args[flag] = str(value)
    argv = [token for flag, value in args.items() for token in (flag, value)]
    return argv + (["--out", str(out)] if out is not None else [])


def run_and_capture(args, capsys):
    """train.main(args) in-process, as the command line would end: (exit status, non-empty stderr
    lines).

    sys.exit("message") (argparse's errors here) is printed to stderr with status 1 by the
    interpreter, and warnings are printed to stderr by the command line (pytest would record them
    instead): both are added to the lines, so that they count as the user would see them."""
    capsys.readouterr()  # drop what earlier steps printed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_train(*args)
    err = capsys.readouterr().err
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    err = (
        "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown)
        + err
    )
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return (0 if code is None else code), err.strip().splitlines()


def assert_one_clear_line(code, lines, *facts):
    """Refused (non-zero status) with exactly one line, no traceback, naming every one of
    `facts`."""
    shown = "\n".join(lines)
    assert code != 0, f"exit status 0 for a bad input; stderr:\n{shown}"
    assert "Traceback" not in shown, f"a traceback on stderr:\n{shown}"
    assert len(lines) == 1 and lines[0].strip(), (
        f"expected exactly one line on stderr, got {len(lines)}:\n{shown}"
    )
    missing = [str(fact) for fact in facts if str(fact) not in lines[0]]
    assert not missing, f"the message does not mention {missing}:\n{shown}"
    return lines[0]


def fails_with_one_line(args, capsys, *facts):
    return assert_one_clear_line(*run_and_capture(args, capsys), *facts)


def file_hashes(folder):
    """{file name: sha256 of its bytes} for every file in `folder`."""
    snapshot = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            snapshot[name] = hashlib.sha256(f.read()).hexdigest()
    return snapshot


@pytest.fixture(scope="module")
def finished_run(weight_files, tmp_path_factory):
    """A finished quick run, from the good vit_t16.npz (the control: the file the truncated ones are
    cut from goes through train.py): (its --out folder, the snapshot of its files)."""
    out = tmp_path_factory.mktemp("finished_run") / "run"
    with one_thread():
        train.main(quick_run_args(out, weights=weight_files["vit_t16.npz"]))
    for name in RUN_FILES:
        assert os.path.isfile(out / name), f"the quick run did not write {name}"
    return out, file_hashes(out)


class LayerScale(torch.nn.Module):
    """DINOv2's per-channel scale after each branch (timm's ls1, ls2)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.gamma


class TimmStyleBlock(torch.nn.Module):
    """timm's ViT block by its module names (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1,
    mlp.fc2, ls2); its forward calls no adapter, so add_adapters must hook it."""

    def __init__(self, dim, heads, layer_scale=False):
        super().__init__()
        self.norm1, self.attn = torch.nn.LayerNorm(dim, eps=1e-6), vit.Attention(dim, heads)
        self.norm2, self.mlp = torch.nn.LayerNorm(dim, eps=1e-6), vit.Mlp(dim, 2 * dim)
        self.ls1, self.ls2 = (
            (LayerScale(dim), LayerScale(dim)) if layer_scale else (torch.nn.Identity(),) * 2
        )

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmStyleViT(torch.nn.Module):
    """timm's VisionTransformer by its names (patch_embed.proj, cls_token, reg_token, pos_embed,
    blocks, norm, head); `registers`: DINOv2's register tokens. Without them, the names and shapes
    of tiny_vit(depth=3)."""

    def __init__(self, dim=32, depth=3, layer_scale=False, registers=0):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.reg_token = torch.nn.Parameter(torch.randn(1, registers, dim)) if registers else None
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = torch.nn.Sequential(
            *[TimmStyleBlock(dim, 2, layer_scale) for _ in range(depth)]
        )
        self.norm, self.head = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.Linear(dim, 5)

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        if self.reg_token is not None:
            x = torch.cat([x[:, :1], self.reg_token.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


ARC_RANK = 4
