"""Tests for ARC (arc.py), the ViT and Swin models and their weight loaders (vit.py, swin.py), the data readers
(data.py), the training step and loop (train.py), a run's life (runs.py), suites and the paper's recipes (paper.py),
the command line's errors, the README's examples and the speed and GPU checks (bench.py, .ci/gpu).
Run: python -m pytest

Sections, in this order: shared fixtures and helpers; then one section a subject, in the order of the files.
Tiny model configs test behaviour; full-size configs appear only where size matters (parameter counts against the
paper, checkpoint shapes). Nothing here needs a GPU or the network: the test_cuda_* tests are skipped without one.
"""
import contextlib
import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import arc
import data
import paper
import runs
import swin
import train
import vit


# ---------------------------------------------------------------------------------------------------
# Shared fixtures and helpers: tiny models, weight files, images and datasets on disk, quick runs of train.py


HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_vit(**kw):
    return vit.VisionTransformer(patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, img_size=32, **kw)


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
            p.copy_(torch.randn_like(p) * std + (1.0 if re.search(r"norm\d?\.weight$", name) else 0.0))
    return model


def write_google_npz(path, dim, depth, heads, mlp_dim, patch, classes, grid, prefix="", seed=0):
    """A ViT checkpoint in Google's .npz names and layouts (ARC.md section 5), random values."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1
    head_dim = dim // heads
    arrays = {"embedding/kernel": rand(patch, patch, 3, dim), "embedding/bias": rand(dim), "cls": rand(1, 1, dim),
              "Transformer/posembed_input/pos_embedding": rand(1, 1 + grid * grid, dim),
              "Transformer/encoder_norm/scale": 1 + rand(dim), "Transformer/encoder_norm/bias": rand(dim),
              "head/kernel": rand(dim, classes), "head/bias": rand(classes),
              "pre_logits/kernel": rand(dim, dim), "pre_logits/bias": rand(dim)}
    for i in range(depth):
        block, att = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}{norm}/scale"], arrays[f"{block}{norm}/bias"] = 1 + rand(dim), rand(dim)
        for name in ("query", "key", "value"):
            arrays[f"{att}{name}/kernel"], arrays[f"{att}{name}/bias"] = rand(dim, heads, head_dim), rand(heads, head_dim)
        arrays[f"{att}out/kernel"], arrays[f"{att}out/bias"] = rand(heads, head_dim, dim), rand(dim)
        arrays[f"{block}MlpBlock_3/Dense_0/kernel"], arrays[f"{block}MlpBlock_3/Dense_0/bias"] = rand(dim, mlp_dim), rand(mlp_dim)
        arrays[f"{block}MlpBlock_3/Dense_1/kernel"], arrays[f"{block}MlpBlock_3/Dense_1/bias"] = rand(mlp_dim, dim), rand(dim)
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    return arrays


@pytest.fixture(scope="session")
def vit_b16_npz(tmp_path_factory):
    """Every name and shape of the published imagenet21k/ViT-B_16.npz, pre_logits and 21843-class head included."""
    path = tmp_path_factory.mktemp("weights") / "ViT-B_16.npz"
    arrays = write_google_npz(path, 768, 12, 12, 3072, 16, 21843, 14)
    assert arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (768, 12, 64)
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
    """{name: path} of weight files for --model vit_t16 (img 32): good ones, broken ones, foreign ones."""
    folder = tmp_path_factory.mktemp("weight_files")
    paths = {name: folder / name for name in (
        "vit_t16.pth", "vit_t16.npz", "vit_s16.pth", "vit_s16.npz", "swin_t.pth")}
    torch.save(vit.vit_t16(img_size=32).state_dict(), paths["vit_t16.pth"])
    write_google_npz(paths["vit_t16.npz"], 192, 12, 3, 768, 16, 21843, 14)
    torch.save(vit.vit_s16().state_dict(), paths["vit_s16.pth"])
    write_google_npz(paths["vit_s16.npz"], 384, 12, 6, 1536, 16, 21843, 14)
    torch.save(swin.swin_t(img_size=224).state_dict(), paths["swin_t.pth"])
    # the good files are good: what the broken ones are broken copies of, and the foreign ones load
    # into their own architecture, so a refusal below is about the model, not the file format
    for loader, model, name in ((vit.load_pretrained, vit.vit_t16(img_size=32), "vit_t16.pth"),
                                (vit.load_pretrained, vit.vit_t16(img_size=32), "vit_t16.npz"),
                                (vit.load_pretrained, vit.vit_s16(), "vit_s16.pth"),
                                (vit.load_pretrained, vit.vit_s16(), "vit_s16.npz"),
                                (swin.load_pretrained, swin.swin_t(img_size=224), "swin_t.pth")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 21843-class heads are left out, the grid resized: notes, not faults
            loader(model, paths[name])
    paths["truncated.pth"] = write_first_part(paths["vit_t16.pth"], folder / "truncated.pth")
    paths["truncated.npz"] = write_first_part(paths["vit_t16.npz"], folder / "truncated.npz")
    paths["header_only.npz"] = write_first_part(paths["vit_t16.npz"], folder / "header_only.npz", 0.001)
    paths["empty.pth"] = folder / "empty.pth"
    paths["empty.pth"].write_bytes(b"")
    for name in ("notes.pth", "notes.npz", "notes.txt"):
        paths[name] = folder / name
        paths[name].write_text("These are my notes, not a checkpoint.\nlr 1e-2, 100 epochs\n")
    paths["whole_model.pth"] = folder / "whole_model.pth"  # torch.save(model) instead of its state_dict()
    torch.save(NotAStateDict(), paths["whole_model.pth"])
    paths["plain_pickle.pth"] = folder / "plain_pickle.pth"  # e.g. a .pkl of another framework's weights
    with open(paths["plain_pickle.pth"], "wb") as f:
        pickle.dump({"blocks.0.norm1.weight": [1.0, 2.0]}, f, protocol=4)
    paths["list.pth"] = folder / "list.pth"  # a torch file, but no state dict
    torch.save([torch.zeros(3)], paths["list.pth"])
    return paths


def write_image(path, ident):
    """An 8x8 solid-colour JPEG whose colour encodes `ident` (< 32**3): three base-32 digits, step 8."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = tuple(8 * (ident // 32 ** c % 32) + 4 for c in range(3))
    Image.new("RGB", (8, 8), colour).save(path, quality=100, subsampling=0)


def write_list(list_file, lines):
    os.makedirs(os.path.dirname(list_file), exist_ok=True)
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_dtd_release(root, classes, counts):
    """torchvision's DTD layout under root/dtd/dtd; counts: images per class for train1/val1/test1.
    Lists are sorted by class, as in the release. Returns {split: [names]} and {name: ident}."""
    base, names, idents = root / "dtd" / "dtd", {}, {}
    for split, per_class in zip(("train", "val", "test"), counts):
        names[split] = [f"{c}/{c}_{split}_{i:04d}.jpg" for c in classes for i in range(per_class)]
        for name in names[split]:
            idents[name] = len(idents)
            write_image(base / "images" / name, idents[name])
        write_list(base / "labels" / f"{split}1.txt", names[split])
    return names, idents


IMG_SIZE = 32  # img_size of the data tests and of fgvc_pictures


def fgvc_pictures(tmp_path, sizes=((20, 15), (15, 20), (37, 37), (41, 38), (90, 40))):
    """Cars in VPT's layout: textured pictures of the given (width, height), so that every crop and flip
    differs. Returns the task at IMG_SIZE (resized shorter side 37) and the pictures."""
    root = tmp_path / "fgvc" / "StanfordCars"
    os.makedirs(root)
    pictures = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8))
                for k, (w, h) in enumerate(sizes)]
    for k, picture in enumerate(pictures):
        picture.save(root / f"{k}.png")
    for split in ("train", "test"):
        (root / f"{split}.json").write_text(json.dumps({f"{k}.png": k % 2 for k in range(len(sizes))}))
    return data.build("cars", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0, log=None), pictures


def fgvc_cars(root, n_train, n_test=12):
    """A Stanford Cars folder in VPT's json layout: two classes told apart by brightness, textured."""
    folder, train_set, test_set = root / "fgvc" / "StanfordCars", {}, {}
    for i in range(n_train + n_test):
        os.makedirs(folder / f"c{i % 2}", exist_ok=True)
        ramp = np.add.outer(np.arange(20), 3 * np.arange(24)) % 50  # texture: crops and flips change pixels
        pixels = np.repeat(((150 if i % 2 else 30) + ramp)[:, :, None], 3, axis=2).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 2}" / f"{i}.png")
        (train_set if i < n_train else test_set)[f"c{i % 2}/{i}.png"] = 100 + i % 2
    (folder / "train.json").write_text(json.dumps(train_set))
    (folder / "test.json").write_text(json.dumps(test_set))
    return ["--data", "cars", "--data-dir", str(root), "--model", "vit_t16", "--weights", "none", "--img-size", "16",
            "--warmup-epochs", "0", "--batch-size", "8", "--eval-every", "1"]


def write_vtab_with_broken_images(data_dir, train_images, test_images, task="eurosat"):
    """A VTAB-1k task in NOAH's layout: images/<split>/<name> for each name given, the lists name them all
    (label = index % 10); names that start with 'missing' are listed but not written, names that start
    with 'corrupt' get garbage bytes. Returns the task folder."""
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


TINY_RUN = ["--data", "synthetic", "--model", "vit_t16", "--weights", "none", "--img-size", "16", "--workers", "0",
            "--warmup-epochs", "1", "--epochs", "2", "--eval-every", "1"]


@contextlib.contextmanager
def one_thread():
    """torch on one thread for a while: on a shared or busy CPU, two spinning threads make these tiny runs
    ten times slower, one thread never does."""
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


def stop_at_call(n):
    """A StopFlag.is_set that acts as if Ctrl-C came during the n-th training step."""
    calls = []

    def is_set(self, control_group):
        calls.append(1)
        if len(calls) == n:
            self.signum = signal.SIGINT
        return bool(self.signum)
    return is_set


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "synthetic"
    assert run_train(*TINY_RUN, "--out", out) == 0
    return out


SUITE = ["--model", "vit_t16", "--weights", "none", "--img-size", "16", "--epochs", "2", "--warmup-epochs", "0",
         "--workers", "0"]


# A complete run in a few seconds on a CPU: tiny images, synthetic data, a random ViT-T/16, one epoch.
QUICK_RUN_OPTIONS = {"--data": "synthetic", "--model": "vit_t16", "--weights": "none", "--img-size": "32",
                     "--epochs": "1", "--warmup-epochs": "0", "--workers": "0"}
RUN_FILES = ("adapters.pth", "metrics.jsonl", "checkpoint.pth", "folded.pth")
# warnings Python's command line does not show by default (outside __main__)
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def quick_run_args(out=None, **options):
    """train.py's argv: the quick run above with `options` changed (data_dir="x" -> --data-dir x; None
    drops an option), and --out `out` when given."""
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
    """train.main(args) in-process, as the command line would end: (exit status, non-empty stderr lines).

    sys.exit("message") (argparse's errors here) is printed to stderr with status 1 by the interpreter,
    and warnings are printed to stderr by the command line (pytest would record them instead): both are
    added to the lines, so that they count as the user would see them."""
    capsys.readouterr()  # drop what earlier steps printed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_train(*args)
    err = capsys.readouterr().err
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    err = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown) + err
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return (0 if code is None else code), err.strip().splitlines()


def assert_one_clear_line(code, lines, *facts):
    """Refused (non-zero status) with exactly one line, no traceback, naming every one of `facts`."""
    shown = "\n".join(lines)
    assert code != 0, f"exit status 0 for a bad input; stderr:\n{shown}"
    assert "Traceback" not in shown, f"a traceback on stderr:\n{shown}"
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one line on stderr, got {len(lines)}:\n{shown}"
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
    """A finished quick run, from the good vit_t16.npz (the control: the file the truncated ones are cut
    from goes through train.py): (its --out folder, the snapshot of its files)."""
    out = tmp_path_factory.mktemp("finished_run") / "run"
    with one_thread():
        train.main(quick_run_args(out, weights=weight_files["vit_t16.npz"]))
    for name in RUN_FILES:
        assert os.path.isfile(out / name), f"the quick run did not write {name}"
    return out, file_hashes(out)


# ---------------------------------------------------------------------------------------------------
# The method (arc.py): parameter counts, initialisation, folding, add_adapters on every model family, its errors


def is_arc_or_head(name):
    return "adapter" in name or "down_proj" in name or name.startswith("head.")


class LayerScale(torch.nn.Module):
    """DINOv2's per-channel scale after each branch (timm's ls1, ls2)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.gamma


class TimmStyleBlock(torch.nn.Module):
    """timm's ViT block by its module names (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2); its
    forward calls no adapter, so add_adapters must hook it."""

    def __init__(self, dim, heads, layer_scale=False):
        super().__init__()
        self.norm1, self.attn = torch.nn.LayerNorm(dim, eps=1e-6), vit.Attention(dim, heads)
        self.norm2, self.mlp = torch.nn.LayerNorm(dim, eps=1e-6), vit.Mlp(dim, 2 * dim)
        self.ls1, self.ls2 = (LayerScale(dim), LayerScale(dim)) if layer_scale else (torch.nn.Identity(),) * 2

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmStyleViT(torch.nn.Module):
    """timm's VisionTransformer by its names (patch_embed.proj, cls_token, reg_token, pos_embed, blocks, norm,
    head); `registers`: DINOv2's register tokens. Without them, the names and shapes of tiny_vit(depth=3)."""

    def __init__(self, dim=32, depth=3, layer_scale=False, registers=0):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.reg_token = torch.nn.Parameter(torch.randn(1, registers, dim)) if registers else None
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = torch.nn.Sequential(*[TimmStyleBlock(dim, 2, layer_scale) for _ in range(depth)])
        self.norm, self.head = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.Linear(dim, 5)

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        if self.reg_token is not None:
            x = torch.cat([x[:, :1], self.reg_token.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


class TimmStyleSwin(torch.nn.Module):
    """timm's SwinTransformer by its names: layers.{s}.downsample at the start of stages 1-2, layers.{s}.blocks.{j},
    head.fc. Its blocks attend over all tokens, not windows: add_adapters sees only names and widths."""

    def __init__(self, dim=16, depths=(2, 2, 2)):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, 8, 8)
        self.layers = torch.nn.Sequential()
        for s, depth in enumerate(depths):
            stage = torch.nn.Sequential()
            stage.downsample = torch.nn.Linear(dim * 2 ** (s - 1), dim * 2 ** s) if s else torch.nn.Identity()
            stage.blocks = torch.nn.Sequential(*[TimmStyleBlock(dim * 2 ** s, 2) for _ in range(depth)])
            self.layers.append(stage)
        self.norm, self.head = torch.nn.LayerNorm(dim * 2 ** s), torch.nn.Module()
        self.head.fc = torch.nn.Linear(dim * 2 ** s, 5)

    def forward(self, images):
        x = self.layers(self.patch_embed.proj(images).flatten(2).transpose(1, 2))
        return self.head.fc(self.norm(x).mean(1))


class HFStyleAttention(torch.nn.Module):
    """transformers 5's ViTAttention by its names: three projections fed the same tokens, and o_proj."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, hidden_states):
        B, N, C = hidden_states.shape
        split = lambda t: t.view(B, N, self.heads, -1).transpose(1, 2)
        q, k, v = split(self.q_proj(hidden_states)), split(self.k_proj(hidden_states)), split(self.v_proj(hidden_states))
        return self.o_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class HFStyleLayer(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attention, self.mlp = HFStyleAttention(dim), vit.Mlp(dim, 2 * dim)
        self.layernorm_before, self.layernorm_after = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attention(self.layernorm_before(hidden_states))
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))


class HF4StyleLayer(torch.nn.Module):
    """transformers 4's ViTLayer by its names (as in 4.57): attention.attention.{query,key,value},
    attention.output.dense, intermediate.dense, output.dense."""

    def __init__(self, dim):
        super().__init__()
        self.attention, self.intermediate, self.output = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
        self.attention.attention, self.attention.output = torch.nn.Module(), torch.nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.attention, name, torch.nn.Linear(dim, dim))
        self.attention.output.dense = torch.nn.Linear(dim, dim)
        self.intermediate.dense, self.output.dense = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.layernorm_before, self.layernorm_after = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)

    def forward(self, hidden_states):
        h, attention = self.layernorm_before(hidden_states), self.attention.attention
        B, N, C = h.shape
        split = lambda t: t.view(B, N, 2, -1).transpose(1, 2)
        mixed = torch.nn.functional.scaled_dot_product_attention(
            split(attention.query(h)), split(attention.key(h)), split(attention.value(h))).transpose(1, 2)
        hidden_states = hidden_states + self.attention.output.dense(mixed.reshape(B, N, C))
        h = torch.nn.functional.gelu(self.intermediate.dense(self.layernorm_after(hidden_states)))
        return hidden_states + self.output.dense(h)


class HFStyleViT(torch.nn.Module):
    """transformers' ViTForImageClassification by its names: vit.embeddings, vit.layers.{i} (version 5) or
    vit.encoder.layer.{i} (version 4), vit.layernorm, classifier."""

    def __init__(self, dim=32, depth=3, version=5):
        super().__init__()
        self.vit = torch.nn.Module()
        self.vit.embeddings = torch.nn.Conv2d(3, dim, 8, 8)
        layers = torch.nn.ModuleList((HFStyleLayer if version == 5 else HF4StyleLayer)(dim) for _ in range(depth))
        if version == 5:
            self.vit.layers = layers
        else:
            self.vit.encoder = torch.nn.Module()
            self.vit.encoder.layer = layers
        self.vit.layernorm, self.classifier = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 5)

    def forward(self, pixel_values):
        x = self.vit.embeddings(pixel_values).flatten(2).transpose(1, 2)
        for layer in self.vit.layers if hasattr(self.vit, "layers") else self.vit.encoder.layer:
            x = layer(x)
        return self.classifier(self.vit.layernorm(x)[:, 0])


def _torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                           num_classes=5)


ARC_FAMILIES = {  # name -> (a small model, its input size, [(width, blocks of that width)])
    "timm ViT": (TimmStyleViT, 32, [(32, 3)]),
    "timm DINOv2 (LayerScale, registers)": (lambda: TimmStyleViT(layer_scale=True, registers=2), 32, [(32, 3)]),
    "timm Swin": (TimmStyleSwin, 32, [(16, 2), (32, 2), (64, 2)]),
    "torchvision ViT": (lambda: torchvision.models.VisionTransformer(32, 8, 3, 2, 32, 64, num_classes=5), 32, [(32, 3)]),
    "torchvision Swin": (_torchvision_swin, 32, [(16, 2), (32, 2)]),
    "transformers ViT": (HFStyleViT, 32, [(32, 3)]),
    "transformers 4 ViT": (lambda: HFStyleViT(version=4), 32, [(32, 3)]),
    "vit.py": (lambda: tiny_vit(num_classes=5), 32, [(32, 2)]),
    "swin.py": (lambda: swin_tiny(), 64, [(16, 2), (32, 2), (64, 2)]),
}
ARC_RANK = 4


def _layer_weight(layer):
    return layer.in_proj_weight if isinstance(layer, torch.nn.MultiheadAttention) else layer.weight


def _arc_on(family, method="arc", dropout=0.1):
    """(the plain model, a copy with ARC, its non-zero ARC tensors, in eval mode; input images) of a family."""
    build, size, _ = ARC_FAMILIES[family]
    torch.manual_seed(0)
    plain = build().eval()
    with torch.no_grad():
        for name in arc.arc_state_dict(plain):  # the head alone; some start at zero, which would hide everything
            plain.get_parameter(name).normal_(0, 0.5)
    model = arc.add_adapters(copy.deepcopy(plain), rank=ARC_RANK, method=method, dropout=dropout)
    with torch.no_grad():
        for name in arc.arc_state_dict(model, head=None):
            model.get_parameter(name).normal_(0, 0.3)
    return plain, model, torch.randn(2, 3, size, size)


class FunctionalAttention(vit.Attention):
    """Uses its qkv layer's weight with F.linear, never calling the layer (as torchvision's Swin attention does)."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def test_vit_b16_trainable_parameters_match_the_paper():
    # 2*(768*50) + 12*2*(50+768) + (768*47+47) and 768*50 + 12*(50+768) + 36,143 (ARC.md section 1)
    assert arc.mark_trainable(vit.vit_b16(num_classes=47, arc="arc")) == 132_575
    assert arc.mark_trainable(vit.vit_b16(num_classes=47, arc="arc_att")) == 84_359


def test_swin_b_arc_parameter_counts():
    dims, depths, r, classes = [128, 256, 512, 1024], [2, 2, 18, 2], 50, 47
    head = dims[-1] * classes + classes
    for method, sides in (("arc", 2), ("arc_att", 1)):
        expected = sides * sum(d * r + L * (r + d) for d, L in zip(dims, depths))  # per-stage W, per-block c, b
        model = swin.swin_b(num_classes=classes, arc=method, rank=r)
        assert sum(v.numel() for v in arc.arc_state_dict(model, head=None).values()) == expected
        assert arc.mark_trainable(model) == expected + head
    assert expected == 109_232 and 2 * expected == 218_464  # the paper's 0.27M with the 47-class head


def test_mark_trainable_freezes_the_backbone():
    model = tiny_vit(num_classes=5, arc="arc")
    arc.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"down_proj_att.weight", "down_proj_ffn.weight", "head.weight", "head.bias"} | {
        f"blocks.{i}.adapter_{pos}.{t}" for i in range(2) for pos in ("att", "ffn") for t in ("scale", "bias")}


def test_official_initialisation():
    model = vit.vit_b16(num_classes=47, arc="arc")
    bound = (6 / (768 + 50)) ** 0.5  # xavier-uniform on (d, r)
    assert 0.9 * bound < model.down_proj_att.weight.abs().max() <= bound
    block = model.blocks[3]
    assert torch.all(block.adapter_att.scale == 0) and torch.all(block.adapter_att.bias == 0)
    assert 0 < block.adapter_ffn.scale.abs().max() <= (6 / 51) ** 0.5  # xavier-uniform on (1, r)
    assert torch.all(model.head.weight == 0)
    assert model.blocks[0].adapter_att.down_proj is model.blocks[11].adapter_att.down_proj  # shared


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # ViT dropout: no parameters, the identity in eval mode
@pytest.mark.parametrize("method", ["arc", "arc_att"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_folding_is_exact(method, dtype, tol, dropout):
    torch.manual_seed(0)  # the same model and images whatever ran before
    model = randomize_arc(tiny_vit(num_classes=5, arc=method, dropout=dropout)).to(dtype).eval()
    images = torch.randn(4, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        unfolded = model(images)
        folded_model = arc.reparameterize(copy.deepcopy(model))
        folded = folded_model(images)
        plain = tiny_vit(num_classes=5).to(dtype).eval()
        plain.load_state_dict(folded_model.state_dict(), strict=True)
        assert (folded - unfolded).abs().max() < tol
        assert (plain(images) - unfolded).abs().max() < tol
    assert unfolded.abs().max() > 0.1  # the comparison is not between zeros
    assert not any(arc.is_arc(m) for m in folded_model.modules())


@pytest.mark.parametrize("drop_path", [0.0, 0.3])  # no parameters, the identity in eval mode
@pytest.mark.parametrize("img_size", [64, 32])  # 32 px: the last map (2x2) is smaller than the window
@pytest.mark.parametrize("method", ["arc", "arc_att"])
def test_swin_folding_is_exact(method, img_size, drop_path):
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        model = randomize_swin(swin_tiny(arc=method, rank=6, img_size=img_size, drop_path=drop_path),
                               is_arc_or_head)
        model = model.to(dtype).eval()
        x = torch.randn(3, 3, img_size, img_size, dtype=dtype)
        with torch.no_grad():
            adapted = model(x)
            folded = arc.reparameterize(model)(x)
            plain = swin_tiny(img_size=img_size).to(dtype).eval()
            plain.load_state_dict(model.state_dict(), strict=True)
            assert (folded - adapted).abs().max() < tol
            assert (plain(x) - adapted).abs().max() < tol
            assert adapted.std() > 0.1  # the adapters and head really do something


def test_adapters_change_the_output_and_dropout_acts_in_training():
    model = randomize_arc(tiny_vit(num_classes=5, arc="arc", adapter_dropout=0.5))
    images = torch.randn(2, 3, 32, 32)
    plain = tiny_vit(num_classes=5)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        assert (model.eval()(images) - plain.eval()(images)).abs().max() > 1e-3
        torch.manual_seed(0)
        assert (model.train()(images) - model.eval()(images)).abs().max() > 1e-3


def test_adapter_checkpoint_is_small_and_reloads(tmp_path):
    model = randomize_arc(vit.vit_b16(num_classes=47, arc="arc")).eval()
    path = tmp_path / "adapters.pth"
    torch.save(arc.arc_state_dict(model), path)
    assert path.stat().st_size < 600_000  # 132,575 float32 values and their names
    fresh = vit.vit_b16(num_classes=47, arc="arc").eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in arc.arc_state_dict(model)},
                          strict=False)  # the same frozen backbone, as after load_pretrained
    arc.load_arc_state_dict(fresh, torch.load(path))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    with pytest.raises(ValueError, match="does not fit"):
        arc.load_arc_state_dict(vit.vit_b16(num_classes=47, arc="arc_att"), torch.load(path))


@pytest.mark.parametrize("method", ["arc", "arc_att"])
@pytest.mark.parametrize("family", list(ARC_FAMILIES))
def test_add_adapters_counts_acts_and_folds_back_into_the_original_model(family, method):
    build, _, widths = ARC_FAMILIES[family]
    plain, model, images = _arc_on(family, method)
    head = sum(v.numel() for v in arc.arc_state_dict(plain).values())
    positions = arc.METHODS[method]  # 2 (d r + L (r + d)) per width for arc, half for arc_att
    assert arc.mark_trainable(model) == len(positions) * sum(d * ARC_RANK + L * (ARC_RANK + d) for d, L in widths) + head
    fed = [(name.rpartition("_")[2], adapter.bias.numel(), [(_layer_weight(layer), _layer_weight(layer).clone())
                                                              for layer in adapter.feeds])
           for name, adapter in model.named_modules() if isinstance(adapter, arc.ARCAdapter)]
    with torch.no_grad():
        reference, adapted = plain(images), model(images)
        assert (adapted - reference).abs().max() > 0.05 * reference.abs().max()  # the adapters act
        folded = arc.reparameterize(model)
        assert (folded(images) - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    assert type(folded) is type(plain) and list(folded.state_dict()) == list(plain.state_dict())
    assert [name for name, _ in folded.named_modules()] == [name for name, _ in plain.named_modules()]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in folded.modules())  # every hook removed
    fresh = build().eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), folded(images))
    # the weight changes at one position, stacked over the layers of one width, have rank r: the shared W
    for position in positions:
        for width, _ in widths:
            changes = torch.cat([(after - before).double() for side, d, layers in fed if (side, d) == (position, width)
                                 for after, before in layers])
            assert torch.linalg.matrix_rank(changes, rtol=1e-5) == ARC_RANK, (position, width)


@pytest.mark.parametrize("family", list(ARC_FAMILIES))
def test_an_adamw_step_moves_only_the_arc_tensors_and_the_head(family):
    _, model, images = _arc_on(family)
    model.train()
    arc.mark_trainable(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(images).logsumexp(-1).sum().backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == set(arc.arc_state_dict(model)) and any(name.startswith(("head", "classifier")) for name in moved)


@pytest.mark.parametrize("family", list(ARC_FAMILIES))
def test_arc_state_dict_round_trips_into_a_second_model(family):
    plain, model, images = _arc_on(family)
    second = arc.add_adapters(copy.deepcopy(plain), rank=ARC_RANK)
    arc.load_arc_state_dict(second, arc.arc_state_dict(model))
    with torch.no_grad():
        assert torch.equal(second(images), model(images))
    with pytest.raises(ValueError, match="does not fit this model"):
        arc.load_arc_state_dict(arc.add_adapters(copy.deepcopy(plain), rank=ARC_RANK, method="arc_att"),
                                arc.arc_state_dict(model))


def test_vit_py_with_arc_and_a_timm_vit_with_add_adapters_give_the_same_logits():
    ours = randomize_arc(vit.VisionTransformer(8, 32, 3, 2, 64, num_classes=5, img_size=32, arc="arc",
                                               rank=ARC_RANK)).eval()
    timm_like = TimmStyleViT()  # timm's names: vit.py's backbone, then its ARC tensors, load as they are
    timm_like.load_state_dict({k: v for k, v in ours.state_dict().items() if k in timm_like.state_dict()}, strict=True)
    arc.load_arc_state_dict(arc.add_adapters(timm_like, rank=ARC_RANK).eval(), arc.arc_state_dict(ours))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(timm_like(images), ours(images))


def test_q_k_and_v_projections_share_one_adapter_output_and_dropout_mask():
    model = arc.add_adapters(HFStyleViT(), rank=ARC_RANK, dropout=0.5).train()
    seen, computed = [], []
    for layer in model.vit.layers:
        layer.adapter_att.register_forward_hook(lambda module, args, out: computed.append(out))
        for projection in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
            projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # after ARC's own hook
    model(torch.randn(2, 3, 32, 32))
    assert len(computed) == 3 and len(seen) == 9
    assert all(seen[3 * i] is seen[3 * i + 1] is seen[3 * i + 2] is computed[i] for i in range(3))


def test_torchvision_swin_b_and_vit_b_16_get_the_paper_s_parameter_counts():
    model = arc.add_adapters(torchvision.models.swin_b(num_classes=47))  # per-stage W: 128, 256, 512, 1024 wide
    assert arc.mark_trainable(model) == 218_464 + 1024 * 47 + 47
    model = arc.add_adapters(torchvision.models.vit_b_16(num_classes=47), method="arc_att")
    assert arc.mark_trainable(model, head="heads") == 84_359


def test_a_copy_of_a_hooked_model_folds_without_touching_the_original():
    _, model, images = _arc_on("transformers ViT")
    with torch.no_grad():
        adapted = model(images)
        arc.reparameterize(copy.deepcopy(model))
        assert torch.equal(model(images), adapted)  # the original keeps its adapters and hooks


def test_a_layer_used_through_its_weight_is_never_silently_left_without_adapters():
    torch.manual_seed(0)
    model = TimmStyleViT().eval()
    for block in model.blocks:
        block.attn.__class__ = FunctionalAttention
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="never called in TimmStyleViT's forward.*'module:linear'"):
        arc.add_adapters(copy.deepcopy(model), rank=ARC_RANK)(images)
    # named as "the module that receives the tokens : the layer it applies to them", it works and folds
    adapted = randomize_arc(arc.add_adapters(model, rank=ARC_RANK, targets={"att": "blocks.*.attn:qkv",
                                                                            "ffn": "blocks.*.mlp.fc1"}))
    with torch.no_grad():
        expected = adapted(images)
        assert (arc.reparameterize(adapted)(images) - expected).abs().max() < 1e-5
    eva_like = TimmStyleViT()  # timm's EVA and BEiT: qkv without bias, q and v biases added by hand in F.linear
    for block in eva_like.blocks:
        block.attn.qkv = torch.nn.Linear(32, 96, bias=False)
        block.attn.q_bias = torch.nn.Parameter(torch.zeros(32))
    names = [name for name, _ in eva_like.named_modules()]
    with pytest.raises(ValueError, match="blocks.0.attn.qkv has no bias.*EVA and BEiT.*not supported"):
        arc.add_adapters(eva_like)
    assert [name for name, _ in eva_like.named_modules()] == names  # refused whole: nothing added before the error


def test_an_unrecognised_model_or_wrong_targets_get_one_clear_error():
    with pytest.raises(ValueError, match=r"does not recognise Sequential: looked for the module names of timm "
                                         r"SwinTransformer.*transformers ViT.*targets=\{'att': 'blocks\.\*\.attn\.qkv'"):
        arc.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"targets\['att'\] = 'blocks.\*.attention' names no module of TimmStyleViT"):
        arc.add_adapters(TimmStyleViT(), targets={"att": "blocks.*.attention", "ffn": "blocks.*.mlp.fc1"})
    model = TimmStyleViT()
    with pytest.raises(ValueError, match="blocks.0.norm2 is a LayerNorm: ARC adapters feed, and fold into, nn.Linear"):
        arc.add_adapters(model, targets={"att": "blocks.*.attn.qkv", "ffn": "blocks.*.norm2"})
    assert not any(arc.is_arc(m) for m in model.modules()) and not model.blocks[0].attn.qkv._forward_pre_hooks
    with pytest.raises(ValueError, match="blocks.0.adapter_att is a slot whose output feeds attn.qkv, not attn.proj"):
        arc.add_adapters(tiny_vit(num_classes=5), targets={"att": "blocks.*.attn.proj", "ffn": "blocks.*.mlp.fc1"})
    with pytest.raises(RuntimeError, match="tokens on meta and its shared W is on cpu.*nn.DataParallel"):
        arc.ARCAdapter(arc.SharedProjection(8, 2), feeds=None)(torch.zeros(1, 8, device="meta"))
    model = randomize_arc(swin_tiny(arc="arc")).eval()  # the check is skipped while torch.fx traces (no devices)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(images), model(images))
    with pytest.raises(ValueError, match="method must be one of"):
        arc.add_adapters(TimmStyleViT(), method="lora")
    with pytest.raises(ValueError, match="exists already"):
        arc.add_adapters(arc.add_adapters(TimmStyleViT()))
    backbone = arc.add_adapters(HFStyleViT().vit, rank=ARC_RANK)  # transformers' ViTModel: no classifier
    with pytest.raises(ValueError, match="Module has no module named head, heads, classifier: pass head="):
        arc.mark_trainable(backbone)
    assert arc.mark_trainable(backbone, head=None) == 2 * (32 * ARC_RANK + 3 * (ARC_RANK + 32))


def test_add_adapters_makes_its_tensors_like_the_model_s_and_leaves_the_backbone_s_modes_alone():
    model = TimmStyleViT().to(torch.float64).eval()
    model.blocks[0].mlp.drop1.train()  # a mode the user set on one backbone module
    arc.add_adapters(model, rank=ARC_RANK)
    assert {p.dtype for name, p in model.named_parameters()} == {torch.float64}
    assert model.blocks[0].mlp.drop1.training and not model.blocks[0].adapter_att.training  # the model's mode: eval
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_torchvision_swins_that_could_not_fold_exactly_are_refused():
    from torchvision.models import swin_transformer as tv
    v2 = tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                            block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2)
    with pytest.raises(ValueError, match="features.1.0.attn.qkv: its attention is cosine attention.*Swin V2"):
        arc.add_adapters(v2)
    v1 = arc.add_adapters(_torchvision_swin(), rank=ARC_RANK).eval()
    assert v1(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # 8x8 and 4x4 maps: the 4x4 windows divide them
    with pytest.raises(ValueError, match="a 10x10 map does not split into 4x4 windows: torchvision's Swin would pad"):
        v1(torch.randn(1, 3, 40, 40))  # padded after the adapter: its bias would reach the padding once folded


# ---------------------------------------------------------------------------------------------------
# The models and their weight loaders (vit.py, swin.py): Google's, timm's and Microsoft's layouts, Swin's semantics


def assert_loaded_like_google(model, arrays):
    """Each loaded tensor computes what the .npz array computes in Google's (in, out) convention."""
    t = lambda name: torch.from_numpy(arrays[name])
    block, att = model.blocks[-1], f"Transformer/encoderblock_{len(model.blocks) - 1}/MultiHeadDotProductAttention_1/"
    with torch.no_grad():
        patch = torch.randn(1, 3, model.patch_size, model.patch_size)
        expected = torch.einsum("chw,hwco->o", patch[0], t("embedding/kernel")) + t("embedding/bias")
        assert torch.allclose(model.patch_embed.proj(patch).flatten(), expected, atol=1e-5)
        x = torch.randn(t("cls").shape[-1])
        qkv = block.attn.qkv(x).chunk(3)
        for out, name in zip(qkv, ("query", "key", "value")):
            expected = torch.einsum("d,dhk->hk", x, t(f"{att}{name}/kernel")) + t(f"{att}{name}/bias")
            assert torch.allclose(out, expected.flatten(), atol=1e-5)
        heads = t(f"{att}out/kernel").shape[0]
        expected = torch.einsum("hk,hkd->d", x.view(heads, -1), t(f"{att}out/kernel")) + t(f"{att}out/bias")
        assert torch.allclose(block.attn.proj(x), expected, atol=1e-5)
        mlp = f"Transformer/encoderblock_{len(model.blocks) - 1}/MlpBlock_3/"
        assert torch.allclose(block.mlp.fc1(x), x @ t(mlp + "Dense_0/kernel") + t(mlp + "Dense_0/bias"), atol=1e-5)
        assert torch.equal(block.norm2.weight, t(f"Transformer/encoderblock_{len(model.blocks) - 1}/LayerNorm_2/scale"))
        assert torch.equal(model.cls_token, t("cls"))
        assert torch.equal(model.norm.bias, t("Transformer/encoder_norm/bias"))


def reference_images(n, size):
    """Deterministic, free of any random number generator: the inputs of the golden-logit tests."""
    return torch.sin(torch.arange(n * 3 * size * size, dtype=torch.float64) * 0.37).view(n, 3, size, size).float()


# Logits of timm 1.0.31's VisionTransformer on the same tiny .npz (loaded by timm's own npz loader) and
# the same inputs, computed once outside this repo: an independent implementation, without depending on it.
TIMM_VIT_LOGITS = [[-0.32729971, 0.47661120, 0.04489766, -0.92059106, -0.45604095],
                   [-0.32190135, 0.50408822, 0.11661853, -1.03994310, -0.51454759]]


def swin_reference_weights():
    """Deterministic random weights, Microsoft's layout, for swin_tiny(): numpy's seeded generator over
    the sorted parameter names, so the same tensors can be fed to timm in a script outside this repo."""
    rng = np.random.default_rng(0)
    sd = {}
    for name, tensor in sorted(swin_tiny().state_dict().items()):
        values = rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
        scale = 0.5 if "relative_position_bias_table" in name else 0.1 if name.endswith("norm.weight") or \
            re.search(r"norm\d\.weight$", name) else 0.2
        sd[name] = torch.from_numpy(values * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return sd


# timm 1.0.31's SwinTransformer (img 64, patch 4, window 4, embed 16, depths (2, 2, 2), heads (1, 2, 4)) on
# swin_reference_weights() renamed to timm's layout, and the same inputs: computed once outside this repo.
TIMM_SWIN_LOGITS = [[0.70471120, 3.41673279, 0.15904297, 0.68525320, -0.99523121],
                    [0.89522320, 2.79173684, 0.50579470, 0.64907320, -1.11739779]]


def swin_reference_arc_tensors(rank=4):
    """Deterministic ARC tensors for swin_tiny(arc="arc", rank=rank), from numpy's seeded generator as above."""
    rng = np.random.default_rng(1)
    model = swin_tiny(arc="arc", rank=rank, ffn_adapter="residual")
    return {name: torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32) * 0.3)
            for name, t in sorted(model.state_dict().items()) if "adapter" in name or "down_proj" in name}


# The official ARC Swin (Model/ARC_swin_b.py at 8227d57, run with torch 2.11 and timm 1.0.31 outside this repo) at
# swin_tiny's size and rank 4, on swin_reference_weights() and swin_reference_arc_tensors() under its names
# (layers.{s}.attn_u, mlp_u; blocks.{j}.attn_lambda, attn_lambda_bias, mlp_lambda, mlp_lambda_bias), in eval mode.
OFFICIAL_ARC_SWIN_LOGITS = [[1.63588762, 0.10339437, 1.52439380, -0.59871161, -0.57261765],
                            [1.99664140, 0.53178465, 1.74008203, -0.74502832, -0.25428307]]


def timm_swin_layout(sd):
    """Microsoft's names -> timm >= 0.9's: downsample at the start of the next stage, head.fc."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", k)
        out[re.sub(r"^head\.", "head.fc.", k)] = v
    return out


def test_auto_weights_for_every_vit_size():
    assert set(vit.URLS) == {"vit_t16", "vit_s16", "vit_b16", "vit_l16", "vit_h14"}
    assert "/augreg/Ti_16-i21k-300ep-" in vit.URLS["vit_t16"] and "/augreg/S_16-i21k-300ep-" in vit.URLS["vit_s16"]


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="arc must be"):
        tiny_vit(arc="lora")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.vit_b16(img_size=200)
    with pytest.raises(ValueError, match="dropout must be"):
        tiny_vit(dropout=1.0)


def test_vit_dropout_sits_after_the_position_embedding_and_in_the_mlp_only():
    # the official "vit_drop": after pos_embed is added, after the MLP's GELU, after its fc2; none in attention
    model = tiny_vit(num_classes=5, dropout=0.5).train()  # no ARC, so no adapter dropout either
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 1 + 2 * len(model.blocks)
    assert vit.vit_t16(dropout=0.25).blocks[11].mlp.drop2.p == 0.25  # the size constructors pass it on
    block, seen = model.blocks[0], {}
    block.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0]))
    block.attn.register_forward_hook(lambda module, args, out: seen.update(attention=out))
    block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.update(fc1=out))
    block.mlp.fc2.register_forward_pre_hook(lambda module, args: seen.update(hidden=args[0]))
    block.mlp.register_forward_hook(lambda module, args, out: seen.update(mlp=out))
    torch.manual_seed(0)
    model(torch.randn(4, 3, 32, 32))
    # dropout leaves exact zeros in about half of the values; these activations have none of their own
    zeros = {name: (seen[name] == 0).float().mean().item() for name in ("tokens", "attention", "hidden", "mlp")}
    assert zeros["attention"] == 0 and all(0.4 < zeros[n] < 0.6 for n in ("tokens", "hidden", "mlp")), zeros
    kept = seen["hidden"] != 0  # and the kept values are GELU's, doubled: the dropout acts after it
    assert torch.allclose(seen["hidden"][kept], 2 * torch.nn.functional.gelu(seen["fc1"][kept]))
    tokens = torch.randn(2, 17, 32)
    assert torch.equal(block.attn(tokens), block.attn(tokens))  # nor on the attention probabilities


@pytest.mark.parametrize("build, rate, size", [
    (lambda **kw: randomize_arc(tiny_vit(num_classes=5, arc="arc", adapter_dropout=0.0, **kw)), "dropout", 32),
    (lambda **kw: randomize_swin(swin_tiny(**kw)), "drop_path", 64)])
def test_vit_dropout_and_swin_drop_path_act_in_training_and_are_the_identity_in_eval(build, rate, size):
    model, without = build(**{rate: 0.3}), build()  # `without`: rate 0, given the same weights
    without.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), without.eval()(images))
        torch.manual_seed(0)
        assert (model.train()(images) - without.train()(images)).abs().max() > 1e-3


def test_vit_logits_match_timm_on_the_same_google_npz(tmp_path):
    write_google_npz(tmp_path / "tiny.npz", 32, 2, 2, 64, 8, 5, 4)
    model = vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "tiny.npz").eval()
    with torch.no_grad():
        logits = model(reference_images(2, 32))
    assert torch.allclose(logits, torch.tensor(TIMM_VIT_LOGITS), atol=1e-5, rtol=0)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))  # Google's eps


def test_full_size_google_npz_loads_into_vit_b16(vit_b16_npz):
    path, arrays = vit_b16_npz
    with pytest.warns(UserWarning, match="head not loaded"):
        model = vit.load_pretrained(vit.vit_b16(num_classes=47, arc="arc"), path)
    assert_loaded_like_google(model, arrays)
    assert torch.all(model.head.weight == 0)
    model = vit.load_pretrained(vit.vit_b16(num_classes=21843), path)
    assert torch.equal(model.head.weight, torch.from_numpy(arrays["head/kernel"]).T)


@pytest.mark.parametrize("prefix", ["", "opt/target/", "params/"])
def test_google_npz_with_prefix_loads(tmp_path, prefix):
    arrays = write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4, prefix=prefix)
    model = vit.load_pretrained(tiny_vit(num_classes=5, arc="arc"), tmp_path / "w.npz")
    assert_loaded_like_google(model, arrays)
    assert torch.equal(model.pos_embed, torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"]))


def test_timm_layout_state_dict_round_trips(tmp_path):
    source = randomize_arc(tiny_vit(num_classes=5))  # a plain ViT with random weights everywhere
    torch.save({"model": source.state_dict()}, tmp_path / "timm.pth")
    model = vit.load_pretrained(tiny_vit(num_classes=5, arc="arc"), tmp_path / "timm.pth")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_position_embeddings_are_resized_for_another_image_size(tmp_path):
    arrays = write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4)
    pos = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
    with pytest.warns(UserWarning, match="resized from 16 to 64 patches"):
        model = vit.load_pretrained(vit.VisionTransformer(8, 32, 2, 2, 64, num_classes=5, img_size=64),
                                    tmp_path / "w.npz")
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(model.pos_embed[:, 0], pos[:, 0])  # the class token's embedding is kept
    grid = model.pos_embed[0, 1:].view(8, 8, 32)
    assert torch.allclose(grid[::2, ::2].mean(), pos[0, 1:].mean(), atol=0.05)  # an interpolation, not noise


def test_arc_py_and_vit_py_copied_alone_build_load_train_fold_and_reload(tmp_path):
    for name in ("arc.py", "vit.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"  # where "auto" finds Google's file, as if downloaded
    hub.mkdir(parents=True)
    write_google_npz(hub / os.path.basename(vit.URLS["vit_t16"]), 192, 12, 3, 768, 16, 5, 2)
    script = """import torch, arc, vit
model = vit.load_pretrained(vit.vit_t16(num_classes=5, img_size=32, arc="arc"), "auto")
arc.mark_trainable(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
images = torch.randn(4, 3, 32, 32)
torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])).backward()
optimizer.step()
with torch.no_grad():
    adapted = model.eval()(images)
    plain = vit.vit_t16(num_classes=5, img_size=32).eval()
    plain.load_state_dict(arc.reparameterize(model).state_dict(), strict=True)
    print((plain(images) - adapted).abs().max().item(), model.blocks[1].adapter_ffn)
"""
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": "", "TORCH_HOME": str(tmp_path / "torch_home")})
    assert result.returncode == 0, result.stderr[-2000:]  # nothing of this repository on its path but the two files
    gap, folded_slot = result.stdout.split(maxsplit=1)
    assert float(gap) < 1e-4 and folded_slot.startswith("Identity()")
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".py")) == ["arc.py", "vit.py"]


def test_bad_weight_files_fail_with_a_clear_error(tmp_path):
    write_google_npz(tmp_path / "large.npz", 48, 2, 2, 64, 8, 5, 4)  # wider: another model size
    with pytest.raises(vit.CheckpointError, match=r"large\.npz does not fit.*patch_embed\.proj\.weight \(48, 3, 8, 8\) vs \(32, 3, 8, 8\)"):
        vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "large.npz")
    torch.save({"layers.0.blocks.0.attn.qkv.weight": torch.zeros(3)}, tmp_path / "swin.pth")
    with pytest.raises(vit.CheckpointError, match=r"swin\.pth does not fit.*missing \['cls_token'"):
        vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "swin.pth")
    with pytest.raises(vit.CheckpointError, match="no such file"):
        vit.load_pretrained(tiny_vit(), tmp_path / "absent.npz")
    write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:5000])
    with pytest.raises(vit.CheckpointError, match=r"cut\.npz: unreadable"):
        vit.load_pretrained(tiny_vit(), tmp_path / "cut.npz")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(vit.CheckpointError, match=r"text\.pth: unreadable"):
        vit.load_pretrained(tiny_vit(), tmp_path / "text.pth")


def test_swin_t_windows_and_buffers():
    model = swin.swin_t()
    assert [s.blocks[1].shift for s in model.layers] == [3, 3, 3, 0]  # 7x7 map in the last stage: no shift
    assert model.layers[3].blocks[0].attn.relative_position_bias_table.shape == (169, 24)
    assert not [k for k in model.state_dict() if "relative_position_index" in k or "attn_mask" in k]
    assert model.layers[0].downsample.reduction.weight.shape == (192, 384)
    assert isinstance(model.layers[3].downsample, torch.nn.Identity)


@pytest.mark.parametrize("kw, message", [
    ({"arc": "lora"}, "arc must be"),
    ({"img_size": 200}, "multiple of 32"),
    ({"img_size": 256}, "windows"),  # 64x64 first map does not split into 7x7 windows
    ({"drop_path": 1.0}, "drop_path must be"),
])
def test_swin_rejects_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        swin.swin_t(**kw)


def test_swin_head_starts_normal_with_std_0_02_and_zero_bias():
    # the official ARC Swin's head: timm's trunc_normal_(std=.02), whose +-2 bounds are 100 std away
    torch.manual_seed(0)
    head = swin_tiny(num_classes=1000).head
    assert 0.0195 < head.weight.std() < 0.0205 and 0.07 < head.weight.abs().max() < 0.2
    assert abs(head.weight.mean()) < 0.001 and torch.all(head.bias == 0)


def test_swin_relative_position_index():
    w = 3
    index = swin.relative_position_index(w)
    for a in range(w * w):
        for b in range(w * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            assert index[a, b] == (ya - yb + w - 1) * (2 * w - 1) + (xa - xb + w - 1)


def test_swin_shift_mask_separates_regions():
    resolution, window, shift = 8, 4, 2
    mask = swin.shift_mask(resolution, window, shift)
    assert mask.shape == (4, 16, 16)
    # independently: in the rolled map, token (i, j) of window (wy, wx) came from across the border
    # along an axis when its rolled coordinate is in the last `shift` rows/columns
    for w in range(4):
        wy, wx = divmod(w, 2)
        for a in range(16):
            for b in range(16):
                (ya, xa), (yb, xb) = divmod(a, 4), divmod(b, 4)
                wrapped = lambda y, x: (wy * 4 + y >= resolution - shift, wx * 4 + x >= resolution - shift)
                assert mask[w, a, b] == (0.0 if wrapped(ya, xa) == wrapped(yb, xb) else -100.0)
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all() and (mask[0] == 0).all() and (mask[3] == -100).any()


def test_swin_shift_mask_broadcasts_over_images_instead_of_being_copied(monkeypatch):
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        masks.append((q.shape, attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(swin.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        swin_tiny().eval()(torch.randn(3, 3, 64, 64))
    # stage 0: 16 windows of 4x4 tokens, 1 head, 3 images. A plain block attends as (images x windows, heads)
    # with its bias for all; a shifted one as (images, windows x heads) with one shift mask broadcast over
    # the images, not repeated per image
    assert all(mask[0] == 1 and q[1] == mask[1] for q, mask in masks)
    assert [(tuple(q[:2]), tuple(mask)) for q, mask in masks[:2]] == [((48, 1), (1, 1, 16, 16)), ((3, 16), (1, 16, 16, 16))]


@pytest.mark.parametrize("shift, token, reached", [
    (0, (0, 0), {(y, x) for y in range(4) for x in range(4)}),     # its own 4x4 window
    (2, (3, 3), {(y, x) for y in range(2, 6) for x in range(2, 6)}),  # the window shifted by (2, 2)
    (2, (0, 0), {(y, x) for y in range(2) for x in range(2)}),     # wrapped around: the mask isolates it
])
def test_swin_block_attends_within_its_window(shift, token, reached):
    torch.manual_seed(0)
    block = swin.Block(8, 2, resolution=8, window=4, shift=shift).eval()
    x = torch.randn(1, 64, 8)
    nudged = x.clone()
    nudged[0, token[0] * 8 + token[1]] += torch.randn(8)  # not a constant: LayerNorm would erase it
    with torch.no_grad():
        changed = (block(nudged) - block(x)).abs().amax(-1)[0] > 1e-6
    assert {divmod(i, 8) for i in changed.nonzero().flatten().tolist()} == reached


def test_swin_images_in_a_batch_are_independent():
    # the per-window mask must line up with each image's windows, not leak across images
    model = randomize_swin(swin_tiny()).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), torch.cat([model(image[None]) for image in x]), atol=1e-5)


def test_swin_patch_merging_order():
    # Microsoft's order, which the pretrained reduction weights expect: (0,0), (1,0), (0,1), (1,1) as (row, col)
    merging, seen = swin.PatchMerging(1, resolution=4), []
    merging.norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    merging(torch.arange(16.0).view(1, 16, 1))  # token value = row * 4 + col
    assert seen[0][0].tolist() == [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]]


def test_swin_drop_path_rates_rise_linearly_over_all_blocks():
    rates = [block.drop_path.p for stage in swin_tiny(drop_path=0.5).layers for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-6)  # 3 stages of 2 blocks
    rates = [block.drop_path.p for stage in swin.swin_b(drop_path=0.1).layers for block in stage.blocks]
    assert len(rates) == 24 and rates[0] == 0 and rates[-1] == pytest.approx(0.1)
    assert rates[4] == pytest.approx(0.4 / 23)  # the first block of stage 2: the rates run on across stages


def test_swin_drop_path_drops_whole_samples_and_rescales_the_others():
    drop = swin.DropPath(0.25).train()
    x = torch.rand(4000, 3, 5) + 1  # no zeros of its own
    torch.manual_seed(0)
    y = drop(x)
    kept, dropped = (y != 0).flatten(1).all(1), (y == 0).flatten(1).all(1)
    assert (kept | dropped).all() and 0.72 < kept.float().mean() < 0.78
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert drop.eval()(x) is x


def test_swin_drop_path_acts_on_both_residual_branches():
    torch.manual_seed(0)
    block = swin.Block(8, 2, resolution=8, window=4, shift=2, drop_path=0.5).train()
    x = torch.randn(64, 64, 8)
    with torch.no_grad():
        unchanged = (block(x) == x).flatten(1).all(1)
    assert 0 < unchanged.sum() < 64  # samples whose two branches were both dropped pass through as they are


@pytest.mark.parametrize("placement", ["norm2", "residual"])
def test_swin_ffn_adapter_on_the_residual_stream_is_the_official_placement_and_does_not_fold(placement):
    # with the MLP's output zeroed, a block's FFN branch adds nothing: whatever the FFN-side adapter still
    # changes, it changes on the skip path. The official ARC Swin's adapter (residual) adds its b_l to every
    # token there; the foldable one (norm2) only feeds the MLP, so it changes nothing
    model = swin_tiny(arc="arc", rank=4, ffn_adapter=placement).eval()
    assert arc.mark_trainable(model) == arc.mark_trainable(swin_tiny(arc="arc", rank=4))  # the same tensors
    block = model.layers[0].blocks[1]
    with torch.no_grad():
        block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_(), block.adapter_ffn.scale.zero_()
        x = torch.randn(2, 256, 16)
        before = block(x)
        block.adapter_ffn.bias.copy_(torch.arange(16.0))
        change = block(x) - before
    assert torch.allclose(change, torch.arange(16.0).expand_as(change) * (placement == "residual"), atol=1e-5)
    if placement == "residual":
        with pytest.raises(ValueError, match="adapter_ffn .* transforms the input of a norm.*residual stream"):
            arc.reparameterize(model)
    with pytest.raises(ValueError, match="ffn_adapter must be 'norm2'"):
        swin_tiny(ffn_adapter="fc1")


def test_swin_logits_match_timm_on_the_same_weights(tmp_path):
    torch.save({"model": swin_reference_weights()}, tmp_path / "swin.pth")  # Microsoft's layout
    model = swin.load_pretrained(swin_tiny(), tmp_path / "swin.pth").eval()
    with torch.no_grad():
        logits = model(reference_images(2, 64))
    assert torch.allclose(logits, torch.tensor(TIMM_SWIN_LOGITS), atol=1e-5, rtol=0)


def test_a_plain_swin_cannot_take_the_residual_placement():
    # add_adapters on it later would feed the slot's adapter to fc1, though the block applies it to the residual stream
    with pytest.raises(ValueError, match="ffn_adapter='residual' places ARC's FFN adapter: build the model with arc="):
        swin_tiny(ffn_adapter="residual")


def test_swin_with_the_residual_ffn_adapter_gives_the_official_arc_swin_logits():
    model = swin_tiny(arc="arc", rank=4, ffn_adapter="residual").eval()
    model.load_state_dict({**swin_reference_weights(), **swin_reference_arc_tensors()}, strict=True)
    with torch.no_grad():
        assert torch.allclose(model(reference_images(2, 64)), torch.tensor(OFFICIAL_ARC_SWIN_LOGITS), atol=1e-5, rtol=0)
        foldable = swin_tiny(arc="arc", rank=4).eval()  # the same tensors, the FFN adapter after norm2: another model
        foldable.load_state_dict(model.state_dict(), strict=True)
        assert (foldable(reference_images(2, 64)) - torch.tensor(OFFICIAL_ARC_SWIN_LOGITS)).abs().max() > 0.1


def test_swin_auto_weights_are_what_the_official_arc_swin_loaded():
    assert set(swin.URLS) == {"swin_t", "swin_s", "swin_b", "swin_l"}
    for url in swin.URLS.values():  # pre-trained on ImageNet-22k, fine-tuned on 1k: not the 22k-only files
        assert re.search(r"/swin_(tiny|small|base|large)_patch4_window7_224_22kto1k(_finetune)?\.pth$", url), url


def test_swin_loads_microsoft_and_timm_layouts(tmp_path):
    sd = randomize_swin(swin_tiny()).state_dict()
    garbage = {"layers.0.blocks.0.attn.relative_position_index": torch.randint(0, 49, (16, 16)),
               "layers.0.blocks.1.attn_mask": torch.randn(16, 16, 16)}
    torch.save({"model": {**sd, **garbage}}, tmp_path / "microsoft.pth")
    torch.save(timm_swin_layout(sd), tmp_path / "timm.pth")
    assert "layers.1.downsample.reduction.weight" in timm_swin_layout(sd)
    x, logits = torch.randn(2, 3, 64, 64), []
    for name in ("microsoft.pth", "timm.pth"):
        torch.manual_seed(0)  # the same adapters in both
        model = swin.load_pretrained(swin_tiny(arc="arc", rank=4), tmp_path / name).eval()
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in sd.items()), name
        assert model.layers[0].blocks[0].attn.relative_position_index.max() == 48  # rebuilt, not loaded
        with torch.no_grad():
            logits.append(model(x))
    assert torch.equal(*logits)
    # another head (e.g. ImageNet-22k's): backbone loads, head stays as initialised
    torch.manual_seed(0)
    initialised = swin_tiny(num_classes=7).head.weight
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"head not loaded from .*microsoft\.pth \(file \[\(5, 64\), \(5,\)\], model "
                                         r"\[\(7, 64\), \(7,\)\]\)"):
        model = swin.load_pretrained(swin_tiny(num_classes=7), tmp_path / "microsoft.pth")
    assert torch.equal(model.head.weight, initialised) and torch.equal(model.norm.weight, sd["norm.weight"])


def test_swin_rejects_mismatching_checkpoints(tmp_path):
    torch.save({"model": swin_tiny().state_dict()}, tmp_path / "narrow.pth")
    torch.save(vit.VisionTransformer(16, 16, 1, 2, 32, img_size=32).state_dict(), tmp_path / "vit.pth")
    wider = swin.SwinTransformer(24, (2, 2, 2), (1, 2, 4), window=4, img_size=64, num_classes=5)
    for model, name in ((wider, "narrow.pth"), (swin_tiny(), "vit.pth")):
        with pytest.raises(vit.CheckpointError, match=re.escape(str(tmp_path / name))):
            swin.load_pretrained(model, tmp_path / name)


# ---------------------------------------------------------------------------------------------------
# The data (data.py): every reader on small datasets written under tmp_path, the crops, the Loader


def image_ident(image):
    """The ident of an image written by write_image, from its uint8 (3, H, W) tensor."""
    digits = ((image.float().mean((1, 2)) - 4) / 8).round().long().tolist()
    return sum(d * 32 ** c for c, d in enumerate(digits))


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
        write_list(folder / f"{split}.txt", [f"images/{split}/{i:06d}.jpg {label}" for i, label in samples])
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
    assert task.train.images.shape == (500, 3, IMG_SIZE, IMG_SIZE) and task.train.images.dtype == torch.uint8
    assert task.test.images.shape == (200, 3, IMG_SIZE, IMG_SIZE)
    assert task.train.labels.dtype == torch.int64 and task.num_classes == 10
    assert torch.bincount(task.train.labels).tolist() == [50] * 10
    assert torch.bincount(task.test.labels).tolist() == [20] * 10
    again = data.build("synthetic", img_size=IMG_SIZE)
    assert torch.equal(again.train.images, task.train.images) and torch.equal(again.test.images, task.test.images)
    image, label = task.train[0]
    assert image.shape == (3, IMG_SIZE, IMG_SIZE) and isinstance(label, int)
    # classes differ in mean colour, so even a linear head on raw statistics separates them
    means = torch.stack([task.train.images[task.train.labels == k].float().mean((0, 2, 3)) for k in range(10)])
    assert torch.cdist(means, means).add(torch.eye(10) * 1e3).min() > 20


@pytest.mark.parametrize("workers", [0, 2])
def test_data_vtab_lists_give_images_and_labels(tmp_path, workers):
    train, test = [(0, 3), (1, 0), (2, 9), (3, 3)], [(10, 1), (11, 7)]
    write_vtab(tmp_path, train, test)
    task = data.build("eurosat", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=workers)
    assert task.num_classes == 10 and isinstance(task.train, data.Preloaded)
    assert task.train.images.shape == (4, 3, IMG_SIZE, IMG_SIZE)
    for dataset, samples in ((task.train, train), (task.test, test)):
        assert list(zip(dataset_idents(dataset), dataset_labels(dataset))) == samples
    assert "eurosat" in task.description and "4 train" in task.description


def test_data_dtd_lists_win_over_torchvision(tmp_path):
    write_vtab(tmp_path, [(0, 46), (1, 2)], [(2, 5)], task="dtd")
    task = data.build("dtd", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0)
    assert task.num_classes == 47 and dataset_labels(task.train) == [46, 2] and "VTAB-1k dtd" in task.description


def test_data_dtd_torchvision_release_on_the_vtab_protocol(tmp_path):
    classes = ["zigzagged", "banded", "meshed", "dotted", "lined"]  # created out of order
    names, idents = write_dtd_release(tmp_path, classes, counts=(180, 50, 4))
    task = data.build("dtd", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=2)
    expected = tfds_first(names["train"], "train", 800) + tfds_first(names["val"], "validation", 200)
    assert dataset_idents(task.train) == [idents[name] for name in expected]
    order = sorted(classes)  # torchvision's and TFDS's class indices
    assert dataset_labels(task.train) == [order.index(name.split("/")[0]) for name in expected]
    assert set(dataset_labels(task.train)) == set(range(5))  # the first 800 lines would miss a class
    assert dataset_idents(task.test) == [idents[name] for name in names["test"]]
    assert dataset_labels(task.test) == [order.index(name.split("/")[0]) for name in names["test"]]
    assert task.num_classes == 5 and "1000 train" in task.description and "20 test" in task.description


def test_data_dtd_download_failure_says_where_and_how(tmp_path, monkeypatch):
    def no_network(*args, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # what torchvision's download goes through
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
        tar.add(source / "dtd" / "dtd", arcname="dtd")  # the release unpacks to dtd/{images,labels,imdb}
    monkeypatch.setattr(torchvision.datasets.DTD, "_MD5", hashlib.md5(archive.read_bytes()).hexdigest())

    def no_network(*args, **kw):
        raise AssertionError("tried the network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    task = data.build("dtd", data_dir=str(tmp_path / "data"), img_size=IMG_SIZE, workers=0)
    assert len(task.train) == 10 and dataset_idents(task.test) == [idents[name] for name in names["test"]]


@pytest.mark.parametrize("name", list(data.FGVC_TASKS))
def test_data_fgvc_json_remaps_ids_and_finds_the_image_folder(tmp_path, name):
    folder, subfolder, num_classes = data.FGVC_TASKS[name]
    root = tmp_path / "fgvc" / folder
    train = {"a/1.jpg": 17, "a/2.jpg": 5, "b/3.jpg": 9, "b/4.jpg": 17}
    test = {"c/5.jpg": 9, "c/6.jpg": 5}
    for ident, path in enumerate([*train, *test]):
        write_image(root / subfolder / path, ident)
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    task = data.build(name, data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0)
    assert task.num_classes == num_classes and folder in task.description
    assert dataset_labels(task.train) == [2, 0, 1, 2] and dataset_labels(task.test) == [1, 0]  # 5, 9, 17 -> 0, 1, 2
    assert dataset_idents(task.train) == [0, 1, 2, 3] and dataset_idents(task.test) == [4, 5]
    images, labels = next(data.Loader(task.train, torch.device("cpu"))([torch.tensor([3, 0, 2])], seed=0))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, IMG_SIZE, IMG_SIZE)
    assert [image_ident(image) for image in images] == [3, 0, 2] and labels.tolist() == [2, 2, 1]
    assert isinstance(task.test, data.Preloaded) and task.test.images.shape == (2, 3, IMG_SIZE, IMG_SIZE)


def test_data_fgvc_random_crops_are_torchvision_s_crops_of_the_resized_images(tmp_path):
    from torchvision.transforms.v2 import functional as F
    task, pictures = fgvc_pictures(tmp_path)
    resized = [F.pil_to_tensor(F.resize(picture, [round(IMG_SIZE * 256 / 224)])) for picture in pictures]
    assert isinstance(task.train, data.Resized)
    assert all(torch.equal(task.train[k][0], image) for k, image in enumerate(resized))  # decoded once, as Resize
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):  # draws at random, and the corners: every (top, left, flip) is torchvision's crop
        room = task.train.shapes - IMG_SIZE + 1
        tops, lefts = (torch.rand(len(resized), 2, generator=generator) * room).long().unbind(1)
        crops = (tops, lefts, torch.rand(len(resized), generator=generator) < 0.5)
        for corner in (crops, (room[:, 0] - 1, room[:, 1] - 1, ~crops[2]), (0 * tops, 0 * lefts, crops[2])):
            index = torch.tensor([4, 0, 3, 1, 2])  # any order: each image at its own offset in the buffer
            batch = task.train.batch(index, corner)
            for image, k in zip(batch, index.tolist()):
                top, left, flip = (int(t[k]) for t in corner)
                expected = F.crop(resized[k], top, left, IMG_SIZE, IMG_SIZE)
                assert torch.equal(image, F.horizontal_flip(expected) if flip else expected)
    loader = data.Loader(task.train, torch.device("cpu"))  # the Loader crops as the epoch's draw says
    images, labels = next(loader([torch.arange(5)], seed=7))
    assert torch.equal(images, task.train.batch(torch.arange(5), task.train.crops(7)))
    assert labels.tolist() == [0, 1, 0, 1, 0]


def test_data_fgvc_crops_depend_on_the_seed_and_the_image_alone(tmp_path):
    task, _ = fgvc_pictures(tmp_path)
    loader = data.Loader(task.train, torch.device("cpu"))
    epoch = lambda seed, batches: dict(zip(torch.cat(batches).tolist(), torch.cat([b for b, _ in loader(batches, seed)])))
    first = epoch(3, [torch.tensor([0, 1, 2]), torch.tensor([3, 4])])
    again = epoch(3, [torch.tensor([4, 2]), torch.tensor([1]), torch.tensor([3, 0])])  # other batches, other order
    assert all(torch.equal(first[k], again[k]) for k in range(5))  # a resumed or distributed run sees the same
    tops, lefts, flips = map(torch.stack, zip(*(task.train.crops(seed) for seed in range(40))))
    assert not torch.equal(tops, tops[:1].expand_as(tops)) and not torch.equal(lefts, lefts[:1].expand_as(lefts))
    assert 0 < flips.float().mean() < 1  # another epoch, other crops and flips
    assert (tops >= 0).all() and (tops <= task.train.shapes[:, 0] - IMG_SIZE).all()
    assert (lefts >= 0).all() and (lefts <= task.train.shapes[:, 1] - IMG_SIZE).all()
    later = epoch(4, [torch.arange(5)])
    assert any(not torch.equal(first[k], later[k]) for k in range(5))


def test_fgvc_augmentation_never_reseeds_the_generators_dropout_draws_from(tmp_path, monkeypatch):
    # the crops are drawn in the training process: reseeding CUDA there would reset the dropout stream on
    # a GPU every epoch, and drawing from the global generators would shift it
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
    assert all(torch.equal(a, b) for a, b in zip(crops, again))  # a function of (seed, image)


def test_data_a_loader_asks_whether_its_split_fits_on_the_device(tmp_path, monkeypatch):
    # with the split's size; what follows (the split kept in host memory, and its batches bitwise the device
    # path's) needs a GPU: test_cuda_a_split_kept_in_host_memory_gives_the_device_path_s_batches_bitwise
    task, _ = fgvc_pictures(tmp_path)
    asked = []
    monkeypatch.setattr(data, "fits_on_device", lambda nbytes, device: asked.append(nbytes) or False)
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
    assert task.num_classes == 2 and "val" in task.description
    assert dataset_labels(task.train) == [0, 1] and dataset_idents(task.train) == [1, 0]  # cat = 0, dog = 1
    assert dataset_labels(task.test) == [0, 1] and dataset_idents(task.test) == [11, 10]
    write_image(tmp_path / "pets" / "test" / "cow" / "0.jpg", 20)  # test/ is preferred to val/
    build_error("cow has no counterpart", str(tmp_path / "pets"))
    build_error("needs train/ and test/", str(tmp_path / "nothing") + os.sep)


def test_data_unknown_name_lists_the_choices():
    message = build_error("unknown dataset 'imagenet'", "imagenet")
    assert all(choice in message for choice in ["synthetic", "cifar", "dsprites_ori", "cub", "cars", "path"])


def test_data_missing_dataset_folders_say_what_was_expected(tmp_path):
    message = build_error("is missing", "cifar", data_dir=str(tmp_path))
    assert os.path.join(str(tmp_path), "vtab-1k", "cifar", "train800val200.txt") in message
    assert "relative to the task folder" in message
    message = build_error("is missing", "cub", data_dir=str(tmp_path))
    assert os.path.join(str(tmp_path), "fgvc", "CUB_200_2011", "train.json") in message
    os.makedirs(tmp_path / "dtd" / "dtd" / "images")  # a half-extracted release
    build_error(r"labels.train1\.txt is missing", "dtd", data_dir=str(tmp_path))


def test_data_missing_names_the_missing_file_of_every_layout(tmp_path):
    """data.missing names the file (not the folder that holds it) for every layout, and build() fails on
    that same file: both read one description of each layout."""
    vtab = write_vtab(tmp_path, [(0, 1)], [(1, 2)], task="kitti")
    os.remove(vtab / "test.txt")
    fgvc = tmp_path / "fgvc" / "NABirds"
    os.makedirs(fgvc)
    (fgvc / "train.json").write_text("{}")
    release = tmp_path / "dtd" / "dtd"
    write_list(release / "labels" / "train1.txt", ["banded/banded_0001.jpg"])
    pets = tmp_path / "pets"
    write_image(pets / "train" / "cat" / "0.jpg", 0)
    for name, absent, kind in (("kitti", vtab / "test.txt", "vtab"), ("nabirds", fgvc / "test.json", "fgvc"),
                               ("dtd", release / "labels" / "val1.txt", "dtd release"), (str(pets), pets / "test", "folder")):
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
    assert os.path.join(str(folder), "images/test/000002.jpg") in message and str(folder / "test.txt") in message

    write_image(folder / "images" / "test" / "000002.jpg", 2)
    (folder / "images" / "train800val200" / "000001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    message = build_error("cannot decode image", "eurosat", data_dir=str(tmp_path), workers=workers)
    assert os.path.join(str(folder), "images/train800val200/000001.jpg") in message


def test_data_broken_lists_are_reported(tmp_path):
    folder = write_vtab(tmp_path, [(0, 1)], [(1, 10)])
    build_error(r"test\.txt: label 10 is outside 0\.\.9", "eurosat", data_dir=str(tmp_path))
    write_list(folder / "test.txt", ["images/test/000001.jpg"])
    build_error(r"test\.txt, line 1: expected '<image path> <label>'", "eurosat", data_dir=str(tmp_path))


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
    """VTAB: Resize((s, s)) bicubic on PIL images; FGVC test: Resize(s * 256/224) + CenterCrop(s) on PIL."""
    from torchvision import transforms as v1
    picture = Image.frombytes("RGB", (20, 15), bytes(range(256)) * 3 + bytes(132))
    picture.save(tmp_path / "p.png")
    write_list(tmp_path / "vtab-1k" / "svhn" / "train800val200.txt", ["../../p.png 4"])
    write_list(tmp_path / "vtab-1k" / "svhn" / "test.txt", ["../../p.png 5"])
    vtab = data.build("svhn", data_dir=str(tmp_path), img_size=IMG_SIZE, workers=0)
    official = v1.Compose([v1.Resize((IMG_SIZE, IMG_SIZE), interpolation=v1.InterpolationMode.BICUBIC),
                           v1.PILToTensor()])
    assert torch.equal(vtab.train[0][0], official(picture))
    os.makedirs(tmp_path / "fgvc" / "StanfordCars")
    picture.save(tmp_path / "fgvc" / "StanfordCars" / "p.png")
    for split in ("train", "test"):
        (tmp_path / "fgvc" / "StanfordCars" / f"{split}.json").write_text(json.dumps({"p.png": 1}))
    fgvc = data.build("cars", data_dir=str(tmp_path), img_size=IMG_SIZE)
    official = v1.Compose([v1.Resize(round(IMG_SIZE * 256 / 224)), v1.CenterCrop(IMG_SIZE), v1.PILToTensor()])
    assert torch.equal(fgvc.test[0][0], official(picture))


def test_decoding_shows_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    write_vtab_with_broken_images(tmp_path / "data", GOOD_IMAGES * 20, GOOD_IMAGES)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    lines = []
    data.build("eurosat", str(tmp_path / "data"), 16, 0, lines.append)
    progress = capsys.readouterr().err
    assert "\rdecoding train: 64/80 images" in progress and "\rdecoding train: 80/80 images" in progress
    assert lines[0].startswith("decoded 80 train images in") and "images/s" in lines[0] and len(lines) == 2


def test_data_a_split_fits_on_the_gpu_in_half_of_what_is_free_and_cached(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * 2**30)  # 2 GiB of it cached, unused
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * 2**30)
    assert data.fits_on_device(4 * 2**30, torch.device("cuda")) and not data.fits_on_device(4 * 2**30 + 1, torch.device("cuda"))
    assert data.fits_on_device(2**50, torch.device("cpu"))  # host memory holds anything


# ---------------------------------------------------------------------------------------------------
# The step and the loop (train.py): learning runs, device reads, bf16, batch shares, NaN, recipes, the fold check


def test_a_synthetic_run_learns_and_folds(synthetic_run):
    history = metrics(synthetic_run)
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[-1]["loss"] < history[0]["loss"] / 3
    assert history[-1]["test_acc"] > 60  # 10 classes: chance is 10%
    assert os.path.getsize(synthetic_run / "adapters.pth") < 200_000


def test_the_same_seed_gives_the_same_loss_curve(synthetic_run, tmp_path):
    assert run_train(*TINY_RUN, "--out", tmp_path / "again") == 0
    assert [m["loss"] for m in metrics(tmp_path / "again")] == [m["loss"] for m in metrics(synthetic_run)]


def test_saved_checkpoints_reproduce_the_accuracy(synthetic_run, capsys):
    accuracy = metrics(synthetic_run)[-1]["test_acc"]
    for name in ("adapters.pth", "folded.pth"):
        assert run_train("--eval-only", "--checkpoint", synthetic_run / name, "--workers", "0") == 0
        assert f"test accuracy {accuracy:.2f}%" in capsys.readouterr().out
    plain = vit.vit_t16(num_classes=10, img_size=16)
    plain.load_state_dict(trained(synthetic_run / "folded.pth"), strict=True)  # the folded model is a plain ViT
    adapters = trained(synthetic_run / "adapters.pth")
    assert any(".adapter_ffn." in k for k in adapters) and "head.weight" in adapters
    assert not any(k.startswith(("blocks.0.attn", "patch_embed")) for k in adapters)


def test_a_linear_probe_saves_loadable_checkpoints_too(tmp_path, capsys):
    out = tmp_path / "linear"
    assert run_train(*TINY_RUN, "--method", "linear", "--epochs", "1", "--warmup-epochs", "0", "--out", out) == 0
    accuracy = metrics(out)[-1]["test_acc"]
    assert set(trained(out / "adapters.pth")) == {"head.weight", "head.bias"}
    for name in ("adapters.pth", "folded.pth"):
        assert run_train("--eval-only", "--checkpoint", out / name, "--workers", "0") == 0
        assert f"test accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_dtd_end_to_end_with_auto_weights(tmp_path, monkeypatch, vit_b16_npz, capsys):
    classes = [f"texture{i}" for i in range(3)]
    write_dtd_release(tmp_path / "data", classes, (6, 3, 4))
    hub = tmp_path / "torch_home"
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(vit_b16_npz[0], hub / "hub" / "checkpoints" / "ViT-B_16.npz")  # where --weights auto looks
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    out = tmp_path / "run"
    assert run_train("--data", "dtd", "--data-dir", tmp_path / "data", "--img-size", "32", "--epochs", "1",
                     "--warmup-epochs", "0", "--batch-size", "16", "--workers", "0", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "27 train" in printed and "12 test images, 3 classes" in printed
    assert "vit_b16 arc: 98,739 trainable parameters" in printed  # 2*(768*50) + 12*2*(50+768) + 768*3+3
    assert "(they agree)" in printed and "best over evaluated epochs" in printed
    assert len(metrics(out)) == 1 and os.path.getsize(out / "adapters.pth") < 1_000_000
    plain = vit.vit_b16(num_classes=3, img_size=32)
    plain.load_state_dict(trained(out / "folded.pth"), strict=True)
    monkeypatch.chdir(tmp_path / "torch_home")  # elsewhere: --eval-only finds the run's data and weights itself
    assert run_train("--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0") == 0
    assert f"test accuracy {metrics(out)[-1]['test_acc']:.2f}%" in capsys.readouterr().out


def test_training_reads_device_values_once_an_epoch_not_once_a_step(tmp_path, monkeypatch):
    reads = []  # the lines of this project's files that read a value off the device

    def counting(original):
        def read(self):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.dirname(os.path.abspath(caller)) == HERE:  # not torch's own CPU AdamW bookkeeping
                reads.append(sys._getframe(1).f_lineno)
            return original(self)
        return read
    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    assert run_train(*TINY_RUN, "--out", tmp_path / "run") == 0  # 2 epochs of 16 steps, evaluated each epoch
    # per epoch: the loss and the accuracy; at the end: the folding check. A read per step (a host sync on a
    # GPU) would add 32.
    assert len(reads) == 2 * 2 + 1, reads


def test_frozen_weights_in_bf16_give_what_autocast_gives_and_come_back_in_float32():
    model = randomize_arc(tiny_vit(num_classes=5, arc="arc")).eval()
    arc.mark_trainable(model)
    originals = {name: p for name, p in model.named_parameters()}
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images)
        with train.frozen_in_bf16(model, enabled=True):
            assert model.blocks[0].attn.qkv.weight.dtype == model.patch_embed.proj.weight.dtype == torch.bfloat16
            assert model.blocks[0].norm1.weight.dtype == model.down_proj_att.weight.dtype == torch.float32
            kept = model(images)
    assert torch.equal(kept, expected)  # bitwise: autocast made the same bf16 copies, once a step
    assert all(p is originals[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


@pytest.mark.parametrize("n, batch_size, world", [(33, 8, 2), (9, 8, 4), (16, 8, 2), (5, 32, 1)])
def test_no_process_gets_an_empty_batch_and_the_weights_give_the_batch_mean(n, batch_size, world):
    order = torch.randperm(n)
    per_rank = [train.shares(order, batch_size, SimpleNamespace(rank=r, world=world)) for r in range(world)]
    for step in range(len(per_rank[0][0])):
        batch = order[step * batch_size:(step + 1) * batch_size]
        assert all(len(indices[step]) > 0 for indices, _ in per_rank)  # no kernel sees a batch of 0
        real = [indices[step] for indices, weights in per_rank if weights[step]]
        assert sorted(torch.cat(real).tolist()) == sorted(batch.tolist())  # every image once, at its weight
        # the summed, weighted losses of all processes, averaged by DDP, give the batch's mean loss
        assert sum(weights[step] * len(indices[step]) for indices, weights in per_rank) / world == pytest.approx(1)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    step = train.train_step
    calls = []

    def diverging_step(*args):
        calls.append(1)
        loss = step(*args)
        return loss * float("nan") if len(calls) == 16 + 7 else loss
    monkeypatch.setattr(train, "train_step", diverging_step)
    out = tmp_path / "nan"
    assert run_train(*TINY_RUN, "--out", out) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "nan or infinite at epoch 2, step 7" in error
    assert len(torch.load(out / "checkpoint.pth", weights_only=True)["history"]) == 1  # epoch 1's, untouched
    assert len(metrics(out)) == 1 and not (out / "adapters.pth").exists()


def test_a_run_states_its_recipe_and_records_the_values_it_used(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(*fgvc_cars(tmp_path, 16), "--epochs", "1", "--workers", "0", "--lr", "0.002", "--out", out) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "FGVC cars (FGVC_ARC_train.py) recipe" in header
    assert "lr 0.002 (command line)" in header and "weight_decay 0.05 (recipe)" in header
    assert "vit_dropout 0.1 (recipe)" in header and "adapter_dropout 0.0 (recipe)" in header
    for name in ("checkpoint.pth", "adapters.pth"):
        saved = torch.load(out / name, weights_only=True)["config"]
        assert (saved["lr"], saved["weight_decay"], saved["vit_dropout"], saved["adapter_dropout"]) == (0.002, 0.05, 0.1, 0)


def test_a_short_run_shortens_the_default_warmup(tmp_path, capsys):
    assert run_train(*quick_run_args(tmp_path / "out", warmup_epochs=None)) == 0  # --epochs 1, warm-up 10 by default
    assert "warmup_epochs 0 (shortened to a tenth of --epochs)" in capsys.readouterr().out
    fails_with_one_line(quick_run_args(tmp_path / "other", warmup_epochs=1), capsys,
                        "--warmup-epochs 1 must be less than")


def test_a_long_cpu_run_says_so_after_its_first_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "LONG_RUN_S", 0)  # every run is long
    assert run_train(*TINY_RUN, "--out", tmp_path / "run") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "s a step" in line)
    assert "for the 26 steps to go" in line and "--model vit_t16" in line and "--device cuda" in line


def test_finish_sends_only_the_fold_check_images_to_the_device(tmp_path, monkeypatch):
    made = []

    class Counting(data.Loader):
        def __init__(self, split, device):
            made.append(len(split))
            super().__init__(split, device)
    monkeypatch.setattr(data, "Loader", Counting)
    assert run_train(*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--out", tmp_path / "run") == 0
    assert made == [500, 200]  # the training and test splits, once each: the fold check sends its 64 images alone


def test_the_official_swin_placement_trains_and_keeps_its_adapters_unfolded(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train.MODELS, "swin_t", lambda **kw: swin.SwinTransformer(16, (2, 2), (1, 2), window=4, **kw))
    out, args = tmp_path / "run", ["--data", "synthetic", "--model", "swin_t", "--weights", "none", "--img-size", "32",
                                   "--epochs", "1", "--warmup-epochs", "0", "--workers", "0"]
    assert run_train(*args, "--swin-ffn-adapter", "residual", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "adapters not folded: with --swin-ffn-adapter residual" in printed and "MISMATCH" not in printed
    assert (out / "adapters.pth").exists() and not (out / "folded.pth").exists()
    assert torch.load(out / "adapters.pth", weights_only=True)["config"]["swin_ffn_adapter"] == "residual"
    assert run_train("--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0") == 0
    assert f"test accuracy {metrics(out)[-1]['test_acc']:.2f}%" in capsys.readouterr().out
    assert run_train("--resume", out, "--workers", "0") == 0 and "has finished" in capsys.readouterr().out
    fails_with_one_line([*TINY_RUN, "--swin-ffn-adapter", "residual"], capsys,
                        "--swin-ffn-adapter does not apply to vit_t16")


# ---------------------------------------------------------------------------------------------------
# Resume and signals (runs.py): Ctrl-C and SIGTERM, bitwise resumes, extensions, checkpoints, metrics.jsonl


def test_an_interrupted_run_resumes_to_the_same_weights(synthetic_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        # 16 steps an epoch, each asking the flag, and one more question at the end of the epoch
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(17 + 5))
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGINT
    error = capsys.readouterr().err
    assert "stopped by SIGINT after 1 epoch(s)" in error and f"--resume {out}" in error
    assert len(metrics(out)) == 1  # epoch 2 was cut at step 5: it runs again, whole, when resumed
    assert run_train(*TINY_RUN, "--out", out, "--resume", out) == 0
    straight, resumed = trained(synthetic_run / "adapters.pth"), trained(out / "adapters.pth")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert metrics(out)[-1]["loss"] == metrics(synthetic_run)[-1]["loss"]


def test_an_fgvc_run_with_random_crops_learns_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    # FGVC trains on random crops of images decoded once; each crop depends on (epoch, image) alone, so a
    # resumed run sees the same crops.
    args = [*fgvc_cars(tmp_path, 48), "--epochs", "3", "--workers", "2"]
    assert run_train(*args, "--out", tmp_path / "straight") == 0
    history = metrics(tmp_path / "straight")
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["test_acc"] == 100.0
    with monkeypatch.context() as patch:
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(7 + 3))  # 6 steps an epoch: epoch 2, step 3
        assert run_train(*args, "--out", tmp_path / "cut") == 128 + signal.SIGINT
    # the rule: a stop mid-epoch keeps the last finished epoch, and the epoch in progress runs again
    assert "stopped by SIGINT after 1 epoch(s)" in capsys.readouterr().err
    assert len(torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["history"]) == 1
    assert run_train(*args, "--out", tmp_path / "cut", "--resume", tmp_path / "cut") == 0
    straight, resumed = trained(tmp_path / "straight" / "adapters.pth"), trained(tmp_path / "cut" / "adapters.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sigterm_stops_saves_and_says_how_to_resume(synthetic_run, tmp_path):
    out = tmp_path / "term"
    process = subprocess.Popen([sys.executable, "train.py", *TINY_RUN, "--out", str(out)], cwd=HERE, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists() and time.time() < deadline:  # epoch 1 is done
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert run_train(*TINY_RUN, "--out", out, "--resume", out) == 0
    straight, resumed = trained(synthetic_run / "adapters.pth"), trained(out / "adapters.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_stop_in_the_first_epoch_says_to_start_again_not_to_resume(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(3))
        assert run_train(*TINY_RUN, "--out", tmp_path / "run") == 128 + signal.SIGINT
    error = capsys.readouterr().err
    assert "No epoch had finished" in error and "--resume" not in error


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2.3}\n')  # what an older version left behind
    fails_with_one_line(quick_run_args(resume=out), capsys, "--resume", out, "no checkpoint.pth", "without --resume")
    assert run_train(*quick_run_args(out)) == 0  # the same command again: it runs
    assert [m["epoch"] for m in metrics(out)] == [1] and "loss" in metrics(out)[0]


def test_metrics_have_one_line_per_epoch_after_a_kill_between_log_and_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(17))  # the question after epoch 1: stop there
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGINT
    with open(out / "metrics.jsonl", "a") as f:  # as if killed after logging epoch 2, before its checkpoint
        f.write(json.dumps({"epoch": 2, "loss": 9.9}) + "\n")
    assert run_train(*TINY_RUN, "--resume", out) == 0
    assert [m["epoch"] for m in metrics(out)] == [1, 2] and metrics(out)[1]["loss"] != 9.9


def test_checkpoints_are_skipped_while_the_last_one_costs_over_a_tenth_of_the_time_since(tmp_path, monkeypatch):
    clock, written = [0.0], []
    monkeypatch.setattr(runs.time, "time", lambda: clock[0])

    def save_checkpoint(run):  # as --method full on a large model: 2 s a checkpoint
        clock[0] += 2.0
        written.append(len(run.history))
    monkeypatch.setattr(runs, "save_checkpoint", save_checkpoint)
    run = runs.Run(runs.Context(torch.device("cpu"), workers=0), SimpleNamespace(epochs=30), str(tmp_path), None, None,
                   history=[])
    checkpoints = runs.Checkpoints(run)
    for epoch in range(30):  # epochs of 1 s, as DTD on ViT-B on a fast GPU
        clock[0] += 1.0
        run.history.append({"epoch": epoch + 1})
        checkpoints.after_epoch(stopping=epoch + 1 == 13)
        assert len(metrics(tmp_path)) == epoch + 1  # metrics.jsonl: every epoch
    # after epoch 1 (it took 2 s), next once 20 s have passed; on the stop after epoch 13; after the last
    assert written == [1, 13, 30] and checkpoints.epochs_saved == 30


def test_a_full_disk_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    save = torch.save

    def full_disk(obj, path, *a, **k):
        if "config" in obj and len(obj.get("history", [])) == 2:
            raise OSError(28, "No space left on device")
        return save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    fails_with_one_line(TINY_RUN + ["--out", out], capsys, out / "checkpoint.pth", "No space left", "intact")
    assert len(torch.load(out / "checkpoint.pth", weights_only=True)["history"]) == 1
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "metrics.jsonl"]  # no .tmp left behind


def test_a_ctrl_c_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(obj, path, *args, **kwargs):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not turned into a UserError: the stop goes on
        runs.save_atomic({"history": []}, str(tmp_path / "checkpoint.pth"))
    assert os.listdir(tmp_path) == []


def test_a_finished_run_is_extended_by_more_epochs(synthetic_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    before = file_hashes(out)
    assert run_train("--resume", out, "--workers", "0") == 0  # nothing to do: nothing written
    assert "has finished its 2 epochs" in capsys.readouterr().out and file_hashes(out) == before
    fails_with_one_line(["--resume", out, "--epochs", "1"], capsys, "would shorten it; a run can only be extended")
    assert run_train("--resume", out, "--epochs", "3", "--workers", "0") == 0
    assert "recomputed for 3 epochs" in capsys.readouterr().out
    history = metrics(out)
    assert [m["epoch"] for m in history] == [1, 2, 3] and "extended from 2 to 3" in history[1]["schedule"]
    assert torch.load(out / "adapters.pth", weights_only=True)["config"]["epochs"] == 3
    assert history[2]["lr"] < history[1]["lr"]  # the new epoch's schedule: after the same cosine, near its end


def test_a_finished_run_is_never_overwritten_and_finishes_again_when_folded_pth_is_lost(synthetic_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    (out / "checkpoint.pth").unlink()  # a user saving space after a run
    fails_with_one_line([*TINY_RUN, "--out", out], capsys, "already holds a run")
    shutil.copy(synthetic_run / "checkpoint.pth", out / "checkpoint.pth")
    (out / "folded.pth").unlink()  # a run stopped while folding
    assert run_train("--resume", out, "--workers", "0") == 0
    plain = vit.vit_t16(num_classes=10, img_size=16)
    plain.load_state_dict(trained(out / "folded.pth"), strict=True)


def test_resume_keeps_the_run_s_own_weights_when_they_move(weight_files, tmp_path, monkeypatch, capsys):
    weights, out = tmp_path / "w.npz", tmp_path / "run"
    shutil.copy(weight_files["vit_t16.npz"], weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # --weights auto would download other weights
    with monkeypatch.context() as patch:
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(17))  # the question after epoch 1 of 2: stop there
        assert run_train(*quick_run_args(out, weights=weights, epochs=2)) == 128 + signal.SIGINT
    fails_with_one_line(["--resume", out, "--workers", "0", "--weights", "auto"], capsys, "auto here",
                        "the run's own weights")
    assert not (tmp_path / "empty_hub").exists()  # refused before any download
    shutil.move(weights, tmp_path / "moved.npz")
    fails_with_one_line(["--resume", out, "--workers", "0"], capsys, weights, "not there now", "--weights")
    assert run_train("--resume", out, "--workers", "0", "--weights", tmp_path / "moved.npz") == 0
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    os.remove(tmp_path / "moved.npz")  # a finished run needs no weights to be resumed: it says it is done
    assert run_train("--resume", out, "--workers", "0") == 0
    assert "has finished its 2 epochs" in capsys.readouterr().out


def test_eval_only_finds_moved_weights_and_data_from_anywhere(weight_files, tmp_path, monkeypatch, capsys):
    weights, out = tmp_path / "w.npz", tmp_path / "run"
    shutil.copy(weight_files["vit_t16.npz"], weights)
    write_vtab_with_broken_images(tmp_path / "data", GOOD_IMAGES, GOOD_IMAGES)
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert run_train(*quick_run_args("run", data="eurosat", data_dir="data", weights="w.npz")) == 0
    accuracy = metrics(out)[-1]["test_acc"]
    (tmp_path / "moved").mkdir()
    shutil.move(weights, tmp_path / "moved" / "w.npz")
    monkeypatch.chdir(tmp_path / "moved")  # elsewhere
    fails_with_one_line(["--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0"], capsys,
                        weights, "not there now", "--weights")
    fails_with_one_line(["--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0",
                         "--weights", weight_files["vit_s16.npz"]], capsys, "--weights", "give the run's own weights")
    capsys.readouterr()
    assert run_train("--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0", "--weights", "w.npz") == 0
    assert f"test accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_a_run_is_finished_until_it_is_continued_and_when_it_folded_where_it_could(tmp_path):
    record = {"epochs": 2, "method": "arc", "model": "swin_t", "swin_ffn_adapter": "residual"}  # an older record:
    runs.save_atomic({"config": {"weights": "none"}, "history": [{}, {}]}, str(tmp_path / "checkpoint.pth"))  # no
    os.utime(tmp_path / "checkpoint.pth", (time.time() + 60,) * 2)  # "folded"; dates do not matter (a copied run)
    runs.save_atomic({"config": record}, str(tmp_path / "adapters.pth"))
    assert runs.finished(tmp_path) == record and runs.finished(tmp_path, 2) == record  # unfoldable: no folded.pth
    assert runs.finished(tmp_path, 3) is None  # more epochs: it is to be extended
    runs.save_atomic({"config": {**record, "swin_ffn_adapter": "norm2"}}, str(tmp_path / "adapters.pth"))
    assert runs.finished(tmp_path) is None  # foldable, and no folded.pth: it stopped while folding
    (tmp_path / "folded.pth").write_bytes(b"")
    assert runs.finished(tmp_path)["epochs"] == 2
    runs.save_atomic({"config": {"weights": "none"}, "history": [{}] * 3}, str(tmp_path / "checkpoint.pth"))
    assert runs.finished(tmp_path) is None  # a checkpoint of a third epoch: it was continued since
    (tmp_path / "checkpoint.pth").write_text("not a checkpoint")
    assert runs.finished(tmp_path) is None  # unreadable: not finished, for --resume to say what is wrong with it
    os.remove(tmp_path / "checkpoint.pth")
    assert runs.finished(tmp_path)["epochs"] == 2  # deleted once the run finished


def test_a_stop_says_how_many_epochs_since_the_last_checkpoint_will_run_again():
    assert str(runs.Interrupted(signal.SIGINT, 5, 5)) == "stopped by SIGINT after 5 epoch(s)"
    assert str(runs.Interrupted(signal.SIGTERM, 7, 4)) == ("stopped by SIGTERM after 7 epoch(s) (3 since the last "
                                                            "checkpoint will run again)")


# ---------------------------------------------------------------------------------------------------
# Several processes: torchrun on the CPU trains what one process trains


def torchrun(args, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "train.py", *map(str, args), "--device", "cpu"], cwd=HERE, capture_output=True, text=True,
                          timeout=600)


def test_a_machine_computes_once_and_hands_the_result_to_its_other_processes(tmp_path):
    # runs.node_once under torchrun (2 gloo processes): the first computes and hands its result over through a
    # private file; when the file cannot be written (a full TMPDIR), the other computes for itself; no file is left
    script, scratch = tmp_path / "once.py", tmp_path / "tmp"
    scratch.mkdir()
    script.write_text(f"""import glob, os, sys, torch
sys.path.insert(0, {HERE!r})
import runs
ctx, calls = runs.setup_distributed("cpu", 0), []
first = runs.node_once(ctx, lambda: calls.append("first") or torch.arange(5))
save = torch.save
def full(*args, **kw):
    raise OSError(28, "No space left on device")
torch.save = full
second = runs.node_once(ctx, lambda: calls.append("second") or "computed")
torch.save = save
left = [name for name in os.listdir({str(scratch)!r}) if name.startswith("arc-")]
with open(os.path.join({str(tmp_path)!r}, f"rank{{ctx.rank}}.txt"), "w") as f:
    f.write(f"{{first.tolist()}} {{second}} {{calls}} {{left}}")
torch.distributed.destroy_process_group()
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=HERE, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "rank0.txt").read_text() == "[0, 1, 2, 3, 4] computed ['first', 'second'] []"
    assert (tmp_path / "rank1.txt").read_text() == "[0, 1, 2, 3, 4] computed ['second'] []"


def test_two_processes_train_the_same_weights_as_one_even_when_one_gets_an_empty_share(tmp_path):
    # an FGVC set: 33 images in batches of 8, so the last batch has one image and the second process gets none
    args = [*fgvc_cars(tmp_path, 33), "--epochs", "2", "--adapter-dropout", "0", "--vit-dropout", "0", "--workers", "1"]
    assert run_train(*args, "--out", tmp_path / "one") == 0
    result = torchrun([*args, "--out", tmp_path / "two"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   2/2") == 1  # rank 0 alone logs
    one, two = trained(tmp_path / "one" / "adapters.pth"), trained(tmp_path / "two" / "adapters.pth")
    # float tolerance: sums over two processes round differently, and Adam scales up tiny gradients
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    assert metrics(tmp_path / "two")[-1]["test_acc"] == metrics(tmp_path / "one")[-1]["test_acc"]


def test_two_processes_draw_their_own_dropout_masks_and_a_stopped_run_resumes_bitwise(tmp_path):
    # torchrun runs a script that records the first dropout mask each process draws in training and, with STOP_AT,
    # makes train.py's stop flag fire in epoch 2 on both processes. Adapter dropout: the recipe's 0.1
    script = tmp_path / "recording.py"
    script.write_text(f"""import os, signal, sys, torch
sys.path.insert(0, {HERE!r})
import runs, train
out, stop_at = sys.argv[sys.argv.index("--out") + 1], int(os.environ.get("STOP_AT", 0))
dropout, calls = torch.nn.Dropout.forward, []
def recording(self, x):
    y = dropout(self, x)
    mask = os.path.join(out, "mask" + os.environ["RANK"] + ".pt")
    if self.training and self.p > 0 and x.ne(0).any() and not os.path.exists(mask):  # (c_att starts at 0)
        torch.save((y == 0) & (x != 0), mask)
    return y
def is_set(self, group):  # 16 steps an epoch, each asking, and one question after the epoch
    calls.append(1)
    self.signum = signal.SIGTERM if len(calls) == stop_at else self.signum
    return bool(self.signum)
torch.nn.Dropout.forward = recording
if stop_at:
    runs.StopFlag.is_set = is_set
train.main()
""")
    run = lambda out, target, *extra, stop_at=0: subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", target, *map(str, TINY_RUN),
         "--out", str(out), "--device", "cpu", *extra], cwd=HERE, capture_output=True, text=True, timeout=600,
        env={**os.environ, "STOP_AT": str(stop_at)})
    straight = run(tmp_path / "straight", str(script))
    assert straight.returncode == 0, straight.stderr[-2000:]
    first, second = (torch.load(tmp_path / "straight" / f"mask{rank}.pt") for rank in (0, 1))
    assert first.shape == second.shape and first.any() and not torch.equal(first, second)  # each its own masks
    stopped = run(tmp_path / "cut", str(script), stop_at=17 + 5)
    assert stopped.returncode != 0 and "stopped by SIGTERM after 1 epoch(s)" in stopped.stderr, stopped.stderr[-2000:]
    resumed = run(tmp_path / "cut", "train.py", "--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one, two = trained(tmp_path / "straight" / "adapters.pth"), trained(tmp_path / "cut" / "adapters.pth")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)  # bitwise
    assert [m["epoch"] for m in metrics(tmp_path / "cut")] == [1, 2]


# ---------------------------------------------------------------------------------------------------
# Suites and the paper's recipes and tables (paper.py)


def write_vtab_by_brightness(data_dir, task, classes, n_train=12, n_test=8):
    """A tiny VTAB-1k task folder; the class is in the brightness, so a head learns it."""
    folder = data_dir / "vtab-1k" / task
    for split, n in (("train800val200", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            image = folder / "images" / split / f"{i:06d}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 + 60 * (i % classes), np.uint8)).save(image)
            lines.append(f"images/{split}/{i:06d}.png {i % classes}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_the_recipe_table_gives_each_task_the_authors_settings_and_the_command_line_wins():
    cfg, sources, name = paper.settings({"data": "cub"})
    assert (cfg.lr, cfg.weight_decay, cfg.adapter_dropout, cfg.vit_dropout) == (1e-3, 0.05, 0.1, 0.1)
    assert "FGVC_ARC_train.py" in name and sources["lr"] == sources["vit_dropout"] == "recipe"
    cfg, sources, _ = paper.settings({"data": "cub", "lr": 0.002})
    assert (cfg.lr, sources["lr"], cfg.weight_decay, sources["weight_decay"]) == (0.002, "command line", 0.05, "recipe")
    cfg, _, _ = paper.settings({"data": "dtd"})  # VTAB-1k on the ViT: the defaults
    assert (cfg.lr, cfg.weight_decay, cfg.adapter_dropout, cfg.vit_dropout, cfg.drop_path) == (1e-2, 0, 0.1, 0, 0)
    cfg, sources, _ = paper.settings({"data": "dtd", "model": "swin_b"})  # what train_ARC_swin.py really ran
    assert (cfg.lr, cfg.weight_decay, cfg.adapter_dropout, cfg.drop_path) == (5e-3, 5e-2, 0.5, 0.1)
    assert (cfg.vit_dropout, sources["vit_dropout"]) == (0.0, "n/a")
    assert paper.settings({"data": "cifar", "model": "swin_b"})[0].weight_decay == 1e-2
    # the options reach the model: dropout p=0.1 in the ViT for CUB, drop-path in Swin
    vit_for_cub = train.build_model(paper.settings({"data": "cub", "model": "vit_t16"})[0], 200)
    assert sorted({m.p for m in vit_for_cub.modules() if isinstance(m, torch.nn.Dropout)}) == [0.1]
    with pytest.raises(train.UserError, match="--drop-path does not apply to vit_b16"):
        paper.settings({"data": "dtd", "drop_path": 0.1})


def test_a_suite_runs_its_tasks_resumes_and_reports_the_paper_s_means(tmp_path, monkeypatch, capsys):
    data_dir, out = tmp_path / "data", tmp_path / "suite"
    tasks = ["dtd", "eurosat", "kitti"]  # one task of each VTAB-1k group: natural, specialized, structured
    for task, classes in zip(tasks, (3, 3, 2)):
        write_vtab_by_brightness(data_dir, task, classes)
    args = ["--data", ",".join(tasks), "--data-dir", data_dir, *SUITE, "--out", out]
    with monkeypatch.context() as patch:  # Ctrl-C in the second task's first epoch (each has 1 step an epoch)
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(2 + 2 + 1))
        assert run_train(*args) == 128 + signal.SIGINT
    assert f"--resume {out}" in capsys.readouterr().err
    assert list(json.loads((out / "results.json").read_text())["tasks"]) == ["dtd"]
    first, stored = file_hashes(out / "dtd"), (out / "suite.json").read_text()
    fails_with_one_line(["--resume", out, "--workers", "0", "--lr", "0.5"], capsys, "--lr 0.01 there, 0.5 here")
    assert (out / "suite.json").read_text() == stored  # a refused option changes nothing
    assert run_train("--resume", out, "--workers", "0") == 0
    assert "has finished its 2 epochs" in capsys.readouterr().out
    assert file_hashes(out / "dtd") == first  # finished: skipped, not trained again
    results = json.loads((out / "results.json").read_text())
    finals = {task: metrics(out / task)[-1]["test_acc"] for task in tasks}
    assert {task: r["final"] for task, r in results["tasks"].items()} == finals
    assert results["groups"] == {"natural": finals["dtd"], "specialized": finals["eurosat"], "structured": finals["kitti"]}
    assert results["mean"] == pytest.approx(sum(finals.values()) / 3, abs=0.006)
    assert "paper" not in results  # vit_t16 is not the paper's model
    table = (out / "results.md").read_text()
    assert "| kitti |" in table and "**structured mean** (1 tasks)" in table and "selected on the test set" in table
    os.remove(out / "dtd" / "checkpoint.pth")  # a finished task's checkpoint deleted (1 GB for full fine-tuning)
    assert run_train("--resume", out, "--workers", "0") == 0
    assert json.loads((out / "results.json").read_text()) == results


def test_a_suite_with_missing_data_stops_before_training_with_one_line(tmp_path, capsys):
    data_dir, out = tmp_path / "data", tmp_path / "suite"
    write_vtab_by_brightness(data_dir, "eurosat", 3)
    fails_with_one_line(["--data", "cifar,eurosat,kitti", "--data-dir", data_dir, *SUITE, "--out", out], capsys,
                        "2 of the 3 tasks", f"cifar ({data_dir / 'vtab-1k' / 'cifar' / 'train800val200.txt'} is missing)",
                        "kitti",
                        "--data eurosat")
    assert not out.exists()


def test_a_folder_in_a_task_list_keeps_the_runs_files_out_of_it(tmp_path):
    images, out = write_image_folder(tmp_path / "my_images"), tmp_path / "suite"
    assert run_train("--data", f"{images},synthetic", *SUITE, "--out", out) == 0
    assert sorted(os.listdir(images)) == ["test", "train"]  # nothing written among the user's images
    assert (out / "my_images" / "folded.pth").exists() and (out / "synthetic" / "folded.pth").exists()
    assert set(json.loads((out / "results.json").read_text())["tasks"]) == {"my_images", "synthetic"}


def test_a_suite_json_in_the_current_folder_is_not_mistaken_for_a_suite(tmp_path, monkeypatch):
    (tmp_path / "suite.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert run_train(*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--out", tmp_path / "run") == 0


def test_a_suite_of_unfoldable_runs_resumes_finished_and_keeps_its_model_in_the_table(tmp_path, monkeypatch, capsys):
    # the official Swin placement writes no folded.pth: its finished tasks must not ask for their data again, and the
    # table names the suite's model and method, also after a resume that repeats none of them
    monkeypatch.setitem(train.MODELS, "swin_t", lambda **kw: swin.SwinTransformer(16, (2, 2), (1, 2), window=4, **kw))
    images, out = write_image_folder(tmp_path / "pets"), tmp_path / "suite"
    args = ["--data", f"synthetic,{images}", "--model", "swin_t", "--swin-ffn-adapter", "residual", "--weights", "none",
            "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--out", out]
    assert run_train(*args) == 0 and not (out / "pets" / "folded.pth").exists()
    shutil.rmtree(images)  # its data gone: a finished task needs none
    assert run_train("--resume", out, "--workers", "0") == 0
    assert capsys.readouterr().out.count("has finished its 1 epochs") == 2
    assert (out / "results.md").read_text().startswith("# ARC: swin_t, arc\n")
    before = file_hashes(out / "synthetic")
    # extending the suite trains every task again: one line about the missing data first, and nothing trained
    fails_with_one_line(["--resume", out, "--epochs", "2", "--workers", "0"], capsys, "no data for 1 of the 2 tasks",
                        "pets")
    assert file_hashes(out / "synthetic") == before


def test_results_give_the_paper_s_group_means_and_overall_mean(tmp_path):
    # the paper's own per-task figures must give back its Table 1 means: 81.6, 85.8, 60.0 and 73.4 (the mean
    # of the 19 tasks, not of the three groups)
    results = {task: {"final": paper.ACCURACY[task], "best": paper.ACCURACY[task], "trainable": 1,
                      "seconds": {"training": 1, "testing": 1}} for task in data.SUITES["vtab-1k"]}
    paper.write_results(str(tmp_path), results, "vit_b16", "arc")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert {g: round(m, 1) for g, m in summary["groups"].items()} == {
        "natural": 81.6, "specialized": 85.8, "structured": 60.0}
    assert round(summary["mean"], 1) == 73.4 and summary["paper"]["mean"] == summary["mean"]
    assert "| cifar | 72.20 | 72.20 | 72.2 | +0.00 |" in (tmp_path / "results.md").read_text()


# ---------------------------------------------------------------------------------------------------
# The command line's errors: one clear line, no traceback, nothing overwritten (in-process, then the real CLI)


def run_cli(args, timeout=120):
    """The real command line: (exit status, non-empty stderr lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    result = subprocess.run([sys.executable, "train.py", *args], cwd=HERE, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    return result.returncode, result.stderr.strip().splitlines()


BAD_COMMANDS_INTO_A_RUN = {  # case -> (out, weight files) -> a command with the finished run's --out
    "a fresh run (no --resume)": lambda out, w: quick_run_args(out),
    "a fresh run of another model": lambda out, w: quick_run_args(out, model="vit_s16"),
    "a truncated --weights": lambda out, w: quick_run_args(out, weights=w["truncated.npz"]),
    "--weights of another model": lambda out, w: quick_run_args(out, weights=w["swin_t.pth"]),
    "an unknown --data": lambda out, w: quick_run_args(out, data="nope"),
    "--rank 0": lambda out, w: quick_run_args(out, rank=0),
    "--img-size 40": lambda out, w: quick_run_args(out, img_size=40),
    "--resume with another --method": lambda out, w: quick_run_args(resume=out, method="linear"),
    "--resume with a truncated --weights": lambda out, w: quick_run_args(resume=out, weights=w["truncated.npz"]),
}


@pytest.mark.parametrize("name", ["missing.pth", "missing.npz"])
def test_missing_weights_file(tmp_path, capsys, name):
    path = tmp_path / name
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize("name", ["truncated.pth", "truncated.npz", "header_only.npz", "empty.pth"])
def test_truncated_weights_file(weight_files, tmp_path, capsys, name):
    path = weight_files[name]
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize("name", ["notes.pth", "notes.npz", "notes.txt", "whole_model.pth", "plain_pickle.pth",
                                  "list.pth"])
def test_weights_file_that_is_not_a_checkpoint(weight_files, tmp_path, capsys, name):
    path = weight_files[name]
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize("name", ["swin_t.pth", "vit_s16.pth", "vit_s16.npz"])
def test_weights_of_another_model_into_vit_t16(weight_files, tmp_path, capsys, name):
    path = weight_files[name]
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize("model, name, says", [("swin_t", "vit_t16.npz", "NumPy .npz archive"),
                                                ("vit_t16", "whole_model.pth", "pickled object"),
                                                ("vit_t16", "truncated.pth", "cut short")])
def test_weight_files_are_described_not_quoted(weight_files, tmp_path, capsys, model, name, says):
    line = fails_with_one_line(quick_run_args(tmp_path / "out", model=model, weights=weight_files[name], img_size=224
                                              if model == "swin_t" else 32), capsys, weight_files[name], says)
    assert "hasRecord" not in line and "PytorchStreamReader" not in line


def test_a_folder_as_weights(tmp_path, capsys):
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=tmp_path), capsys, "--weights", tmp_path, "a folder")


def test_auto_weights_with_a_hub_cache_that_cannot_be_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", "/sys/torch_home")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    fails_with_one_line(quick_run_args(tmp_path / "out", weights="auto"), capsys, "/sys/torch_home", "TORCH_HOME",
                        "--weights PATH")


def test_a_corrupt_file_in_the_hub_cache_is_named_with_how_to_fix_it(monkeypatch, tmp_path, capsys):
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(vit.URLS["vit_t16"])
    cached.parent.mkdir(parents=True)
    cached.write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")  # a proxy's page, saved as .npz
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    line = fails_with_one_line(quick_run_args(tmp_path / "out", weights="auto"), capsys, cached, "web page",
                               "delete it")
    assert "allow_pickle" not in line and "unsafe" not in line


@pytest.mark.parametrize("failure", [urllib.error.URLError("no network"), ConnectionResetError(104, "reset by peer"),
                                     TimeoutError("timed out")])
def test_a_failed_download_is_not_blamed_on_the_cache(tmp_path, monkeypatch, capsys, failure):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # writable: the network is at fault

    def download(url, dst, **kw):
        raise failure
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    line = fails_with_one_line(quick_run_args(tmp_path / "out", weights="auto"), capsys, "could not download",
                               type(failure).__name__, vit.URLS["vit_t16"], "--weights PATH")
    assert "TORCH_HOME" not in line and "cannot write" not in line


def test_missing_weights_and_data_fail_with_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert run_train("--data", "synthetic", "--img-size", "32", "--out", tmp_path / "run") == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "ViT-B_16.npz" in error and vit.URLS["vit_b16"] in error
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in error and "--weights PATH" in error
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(torchvision.datasets.utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.DTD, "_download", lambda self: offline(None, None))
    for name, missing in (("cifar", "vtab-1k/cifar"), ("dtd", "dtd")):  # a VTAB-1k list; a release to download
        line = fails_with_one_line(["--data", name, "--data-dir", tmp_path / "none", "--weights", "none", "--model",
                                    "vit_t16", "--out", tmp_path / name], capsys, tmp_path / "none" / missing)
        assert line.startswith("error: ") and not (tmp_path / name).exists()


def test_an_unknown_data_name_lists_the_choices_in_one_line(tmp_path, capsys):
    fails_with_one_line(quick_run_args(tmp_path / "out", data="eurosatt"), capsys,
                        "eurosatt", "synthetic", "eurosat", "dtd", "cub", "train/")


def test_missing_vtab_dataset_folder(tmp_path, capsys):
    data_dir = tmp_path / "data"  # nothing under it
    fails_with_one_line(quick_run_args(tmp_path / "out", data="eurosat", data_dir=data_dir), capsys,
                        os.path.join(str(data_dir), "vtab-1k", "eurosat"))


def test_missing_image_folder_dataset(tmp_path, capsys):
    path = tmp_path / "my_images"  # does not exist
    fails_with_one_line(quick_run_args(tmp_path / "out", data=path), capsys, path)


def test_list_file_naming_a_missing_image(tmp_path, capsys):
    data_dir = tmp_path / "data"
    write_vtab_with_broken_images(data_dir, GOOD_IMAGES + ["missing_000123.jpg"], GOOD_IMAGES)
    fails_with_one_line(quick_run_args(tmp_path / "out", data="eurosat", data_dir=data_dir), capsys,
                        "missing_000123.jpg", "train800val200.txt")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_in_a_vtab_list_is_named(tmp_path, capsys, workers):
    data_dir = tmp_path / "data"
    folder = write_vtab_with_broken_images(data_dir, GOOD_IMAGES, GOOD_IMAGES + ["corrupt_000007.jpg"])
    fails_with_one_line(quick_run_args(tmp_path / "out", data="eurosat", data_dir=data_dir, workers=workers), capsys,
                        os.path.join(folder, "images", "test", "corrupt_000007.jpg"))


def test_corrupt_image_in_an_image_folder_is_named(tmp_path, capsys):
    root = tmp_path / "my_images"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            write_image(root / split / label / "a.jpg", 0)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG" * 4)
    fails_with_one_line(quick_run_args(tmp_path / "out", data=root), capsys, root / "train" / "dog" / "broken.jpg")


def test_a_list_file_that_is_not_utf8(tmp_path, capsys):
    folder = write_vtab_with_broken_images(tmp_path / "data", GOOD_IMAGES, GOOD_IMAGES)
    with open(os.path.join(folder, "test.txt"), "ab") as f:
        f.write("images/test/caf\u00e9.jpg 1\n".encode("latin-1"))
    fails_with_one_line(quick_run_args(tmp_path / "out", data="eurosat", data_dir=tmp_path / "data"), capsys,
                        os.path.join(folder, "test.txt"), "UTF-8")


def test_missing_data_is_reported_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded before the data check"))
    fails_with_one_line(["--data", "cub", "--data-dir", tmp_path / "data", "--out", tmp_path / "out"], capsys,
                        "no cub data", tmp_path / "data" / "fgvc" / "CUB_200_2011")


def test_the_data_must_have_the_classes_the_run_was_trained_on(tmp_path, capsys):
    two, three = write_image_folder(tmp_path / "two"), write_image_folder(tmp_path / "three", ("cat", "dog", "owl"))
    out = tmp_path / "run"
    assert run_train("--data", two, *SUITE, "--out", out) == 0
    fails_with_one_line(["--eval-only", "--checkpoint", out / "adapters.pth", "--data", three, "--workers", "0"],
                        capsys, "trained on 2 classes", "the data has 3")
    fails_with_one_line(["--resume", out, "--data", three, "--epochs", "3", "--workers", "0"], capsys,
                        "trained on 2 classes", "the data has 3")


@pytest.mark.parametrize("option, value", [("rank", 0), ("rank", -3), ("batch_size", 0), ("lr", -0.1)])
def test_invalid_numbers(tmp_path, capsys, option, value):
    fails_with_one_line(quick_run_args(tmp_path / "out", **{option: value}), capsys,
                        "--" + option.replace("_", "-"), value)


def test_img_size_not_a_multiple_of_the_patch_size(tmp_path, capsys):
    # vit_t16 cuts 16x16 patches: 40 is refused, naming the option, the value and the patch size
    fails_with_one_line(quick_run_args(tmp_path / "out", img_size=40), capsys, "--img-size", "40", "16")


@pytest.mark.parametrize("option, value", [("lr", "1e38"), ("lr", "inf"), ("lr", "nan"), ("weight_decay", "1e300"),
                                           ("adapter_dropout", "1"), ("drop_path", "-0.1")])
def test_absurd_numbers(tmp_path, capsys, option, value):
    fails_with_one_line(quick_run_args(tmp_path / "out", **{option: value}), capsys,
                        f"--{option.replace('_', '-')} {float(value)}")


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    fails_with_one_line(quick_run_args(tmp_path / "notes.txt"), capsys, "--out", tmp_path / "notes.txt", "is a file")
    fails_with_one_line(quick_run_args(tmp_path / "notes.txt" / "run"), capsys, "--out", tmp_path / "notes.txt")
    if os.path.exists("/sys/kernel"):  # sysfs: no folder can be made there, not even by root
        fails_with_one_line(quick_run_args("/sys/arc_run"), capsys, "--out /sys/arc_run", "cannot write in /sys")


@pytest.mark.parametrize("option, value, there", [("model", "vit_s16", "vit_t16"), ("method", "linear", "arc"),
                                                  ("method", "arc_att", "arc")])
def test_resume_from_another_model_or_method(finished_run, capsys, option, value, there):
    out, snapshot = finished_run
    fails_with_one_line(quick_run_args(resume=out, **{option: value}), capsys, "--resume", out, f"--{option}", value,
                        there)
    assert file_hashes(out) == snapshot


def test_resume_from_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails_with_one_line(quick_run_args(resume=tmp_path / "empty"), capsys, "--resume", tmp_path / "empty")


def test_a_mistyped_resume_folder_is_named(tmp_path, capsys):
    fails_with_one_line(["--resume", tmp_path / "runz"], capsys, f"--resume {tmp_path / 'runz'}: no such folder")


def test_folders_in_a_task_list_are_made_absolute_one_by_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dtd").mkdir()  # a folder that happens to bear a dataset's name: the name still means the dataset
    args, given = train.parse_args(["--data", "dtd, ./pets ,synthetic"])
    assert given["data"] == f"dtd,{tmp_path / 'pets'},synthetic"
    assert train.parse_args(["--data", "./dtd"])[1]["data"] == str(tmp_path / "dtd")
    assert train.default_out(given) == os.path.join("runs", "dtd+pets+synthetic_vit_b16_arc")  # each by its name
    assert train.default_out({"model": "swin_b"}) == os.path.join("runs", "dtd_swin_b_arc")


def test_resume_and_option_mistakes_get_one_clear_line(synthetic_run, tmp_path, monkeypatch, capsys):
    fails_with_one_line([*TINY_RUN, "--epochs", "3", "--warmup-epochs", "10"], capsys,
                        "--warmup-epochs 10 must be less than --epochs 3")
    fails_with_one_line([*TINY_RUN, "--device", "gpu"], capsys, "--device gpu is not a device")
    if not torch.cuda.is_available():
        fails_with_one_line([*TINY_RUN, "--device", "cuda"], capsys, "no CUDA GPU")
    fails_with_one_line([*TINY_RUN, "--resume", synthetic_run / "adapters.pth"], capsys,
                        "not a checkpoint.pth (adapters.pth and folded.pth hold results")
    weights = tmp_path / "other.pth"
    torch.save(vit.vit_t16(num_classes=10, img_size=16).state_dict(), weights)
    fails_with_one_line([*TINY_RUN, "--weights", weights, "--resume", synthetic_run], capsys, "--weights none there")
    copy_of_run = tmp_path / "run"
    shutil.copytree(synthetic_run, copy_of_run)
    monkeypatch.chdir(copy_of_run)  # a bare file name: the run's folder is the current one
    assert run_train(*TINY_RUN, "--resume", "checkpoint.pth") == 0


@pytest.mark.parametrize("case, args, facts", [
    ("--resume of a folder that is not a suite", lambda out: ["--data", "dtd,eurosat", "--resume", out],
     ["no suite.json"]),
    ("--resume and --out differ", lambda out: ["--resume", out, "--out", out / "x"], ["name different runs"]),
    ("--vit-dropout for a Swin", lambda out: ["--model", "swin_t", "--vit-dropout", "0.1", "--out", out / "x"],
     ["--vit-dropout does not apply to swin_t"]),
])
def test_suite_resume_and_model_mistakes_leave_a_finished_run_as_it_was(finished_run, capsys, case, args, facts):
    out, snapshot = finished_run
    fails_with_one_line([str(a) for a in args(out)], capsys, *facts)
    assert file_hashes(out) == snapshot


@pytest.mark.parametrize("case", list(BAD_COMMANDS_INTO_A_RUN))
def test_bad_input_never_overwrites_a_finished_run(finished_run, weight_files, capsys, case):
    out, snapshot = finished_run
    code, lines = run_and_capture(BAD_COMMANDS_INTO_A_RUN[case](out, weight_files), capsys)
    assert code != 0, f"{case}: accepted, exit status 0"
    assert file_hashes(out) == snapshot, f"{case}: changed the files of the finished run in {out}"
    assert_one_clear_line(code, lines)


def test_a_fresh_run_into_a_finished_run_says_how_to_continue(finished_run, capsys):
    out, snapshot = finished_run
    fails_with_one_line(quick_run_args(out), capsys, out, "--resume", "--out")
    assert file_hashes(out) == snapshot


def test_help_shows_defaults_and_dataset_names(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 32)", "(default: vit_b16)", "0.01 on VTAB-1k with a ViT (default: the task's recipe)", "eurosat", "cub",
                 "vtab-1k", "synthetic", "--resume", "python train.py --data dtd"):
        assert text in shown, text


def test_cli_unknown_data(tmp_path):
    # the real command line, in its own process: one line, no traceback, nothing written (the cases below run
    # train.main in this process, which ends the same way: see run_and_capture)
    code, lines = run_cli(quick_run_args(tmp_path / "out", data="no_such_task"))
    assert_one_clear_line(code, lines, "no_such_task", "synthetic", "eurosat", "cub")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("case", ["truncated.npz", "notes.pth", "--batch-size 0"])
def test_cli_bad_weights_or_numbers(case, weight_files, tmp_path, capsys):
    if case.startswith("--"):
        args, facts = quick_run_args(tmp_path / "out", batch_size=0), ("--batch-size", "0")
    else:
        args, facts = quick_run_args(tmp_path / "out", weights=weight_files[case]), ("--weights", weight_files[case])
    fails_with_one_line(args, capsys, *facts)
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# The README's examples, run as they are written


def test_the_readme_example_on_a_torchvision_model_runs(tmp_path, monkeypatch, capsys):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        example = re.search(r"## ARC on a model you already have.*?With torchvision.*?```python\n(.*?)```", f.read(),
                            re.S)[1]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(example.replace('weights="IMAGENET1K_V1"', "weights=None"), namespace)  # no download in the tests
    assert capsys.readouterr().out == "132575\n"
    model = namespace["model"]
    assert type(model) is torchvision.models.VisionTransformer and not any(arc.is_arc(m) for m in model.modules())
    assert set(torch.load("adapters.pth")) == {"encoder.down_proj_att.weight", "encoder.down_proj_ffn.weight",
                                               "heads.head.weight", "heads.head.bias"} | {
        f"encoder.layers.encoder_layer_{i}.adapter_{side}.{t}" for i in range(12) for side in ("att", "ffn")
        for t in ("scale", "bias")}
    torchvision.models.vit_b_16(num_classes=47).load_state_dict(torch.load("vit_b_16_arc.pth"), strict=True)


def test_the_folded_model_example_in_the_readme_runs(synthetic_run, tmp_path, monkeypatch, capsys):
    with open(os.path.join(HERE, "README.md")) as f:
        example = re.search(r"## Using the trained model.*?```python\n(.*?)```", f.read(), re.S)[1]
    images = tmp_path / "my_photos"
    task = data.build("synthetic", img_size=16, log=None)
    for i in (0, 25, 150):  # test images of classes 0, 1 and 7
        Image.fromarray(task.test.images[i].permute(1, 2, 0).numpy()).save(images / f"{i}.png" if images.exists()
                                                                           else (images.mkdir() or images / f"{i}.png"))
    example = example.replace("runs/dtd_vit_b16_arc", str(synthetic_run)).replace("my_photos", str(images))
    monkeypatch.chdir(HERE)
    exec(example, {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{images / '0.png'}: class 0", f"{images / '150.png'}: class 7", f"{images / '25.png'}: class 1"]


# ---------------------------------------------------------------------------------------------------
# Speed and the GPU (bench.py, .ci/gpu, the test_cuda_* tests: skipped without a CUDA GPU)


def test_bench_times_a_whole_dtd_shaped_run_through_train_py(capsys):
    import bench
    with one_thread():
        result = bench.main(["--run", "dtd", "--epochs", "1", "--model", "vit_t16", "--img-size", "16", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "dtd_shaped: 1000 train / 1880 test images, 47 classes" in printed  # an image folder of DTD's shape
    for part in ("start-up", "training", "testing", "finish", "wall time", "images/s"):
        assert part in printed, part
    assert set(result["seconds"]) == {"setup", "training", "testing", "finish"} and result["trainable"] == 34_079


def test_bench_waits_for_the_device_it_times(monkeypatch):
    import bench
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    bench.interleaved({"step": lambda: None}, torch.device("cuda:1"), warmup=1, rounds=2)
    assert waited == [torch.device("cuda:1")] * 6  # before and after each of 3 calls, on the GPU it times


def test_bench_report_writes_each_section_with_its_figures(tmp_path, monkeypatch):
    # bench.py --report at a tiny size on the CPU: the sections .ci/gpu asks for but the CUDA tests (which run pytest)
    # and torch.compile (a minute to compile on a CPU); a tiny Swin stands in for Swin-B. The DTD-shaped run itself
    # is test_bench_times_a_whole_dtd_shaped_run_through_train_py's (its printout is this section's markdown): here
    # it returns made-up seconds, whose arithmetic the section must get right
    import importlib.util
    import bench
    monkeypatch.setitem(train.MODELS, "swin_b", lambda **kw: swin.SwinTransformer(16, (2, 2), (1, 2), window=4, **kw))
    result = {"final": 2.13, "seconds": {"setup": 2.0, "training": 20.0, "testing": 3.0, "finish": 1.0}}
    monkeypatch.setattr(bench, "time_dtd_run", lambda args: (result, 26.5))
    path = tmp_path / "report.md"
    with one_thread():
        failed = bench.main(["--report", str(path), "--model", "vit_t16", "--img-size", "16", "--batch-size", "32",
                             "--epochs", "1", "--rounds", "1", "--warmup", "1", "--device", "cpu",
                             "--sections", "steps,dtd,swin,peft,launch"])
    text = path.read_text()
    assert failed == [] and "failed: none" in text and "**FAILED**" not in text
    assert f"| torch | {torch.__version__} |" in text and "| GPU | none (CPU) |" in text
    assert "not run (--sections): CUDA tests, torch.compile trial" in text
    titles = re.findall(r"^## (.+)$", text, re.M)
    assert titles == ["Training and inference steps", "The whole DTD-shaped run", "Swin-B ARC step",
                      "timm + peft LoRA against ARC", "Is the step launch-bound?"]
    number = r"(\d[\d,]*\.\d+)"
    for method in ("arc", "arc_att", "linear", "full"):
        assert re.search(rf"^\| {method} \| {number} \| {number} \| {number}x \| - \|$", text, re.M), method
    for variant in ("plain", "arc unfolded", "arc folded"):
        assert re.search(rf"^\| {variant} \| {number} \| {number} \|$", text, re.M), variant
    seconds = [float(re.search(rf"^\| {part}[^|]* \| \**{number}\** \|$", text, re.M).group(1))
               for part in ("start-up", "training", "testing", "finish", r"\*\*wall time")]
    assert seconds == [2.0, 20.0, 3.0, 1.0, 26.5] and "final accuracy 2.13%" in text
    assert "training: 50 images/s, 625.0 ms a step over 32 steps" in text  # 1,000 images, batch 32, 1 epoch
    paper_setting = SimpleNamespace(model="vit_b16", img_size=224, batch_size=32, epochs=100)
    for wall, verdict in ((26.5, "meets the goal"), (45, "is within the limit (60 s), over the goal"), (61, "is OVER")):
        assert f"the wall time {verdict}" in bench.dtd_markdown(paper_setting, result, wall)
    assert "6.2 ms a step over 3200 steps" in bench.dtd_markdown(paper_setting, result, 26.5)
    assert re.search(rf"swin_b ARC step .*: \*\*{number} images/s\*\*", text)
    if all(importlib.util.find_spec(name) for name in ("timm", "peft")):  # only this section needs them
        for step in ("ARC (ours, vit.py)", "LoRA, frozen weights float32", "LoRA, frozen weights in bf16"):
            assert re.search(rf"^\| {re.escape(step)}[^|]* \| [\d,]+ \| {number} \| {number} \| {number}x \|", text,
                             re.M), step
    else:
        assert "not measured: " in text
    assert re.search(rf"^\| counted by torch.utils.flop_counter [^|]* \| {number} GFLOPs \|$", text, re.M)
    assert "x 32 images; forward 0.0 GFLOPs an image" in text and "verdict: **not meaningful on a CPU**" in text
    assert bench.vit_flops("vit_b16", 224) == pytest.approx(35.1e9, rel=2e-3)  # 17.6 G multiply-adds


def test_a_report_stopped_by_its_time_limit_stops_there_and_keeps_what_it_measured(tmp_path):
    # .ci/gpu's timeout sends SIGTERM; in the DTD-shaped run train.py's stop flag catches it. The report must end
    # there, not go on with the next sections past the GPU session's time
    path = tmp_path / "report.md"
    process = subprocess.Popen([sys.executable, "bench.py", "--report", str(path), "--sections", "dtd,steps", "--model",
                                "vit_t16", "--img-size", "16", "--epochs", "1000", "--device", "cpu"], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "The whole DTD-shaped run" in process.stdout.readline()
    time.sleep(0.5)  # writing the images; in training, train.py's stop flag catches it, and the report stops the same
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    text = path.read_text()
    assert process.returncode == 128 + signal.SIGTERM
    assert text.endswith("stopped in: The whole DTD-shaped run (exit status 143)\n") and "## " not in text


def test_ci_gpu_says_in_one_line_that_there_is_no_gpu(tmp_path):
    # CUDA_VISIBLE_DEVICES empty hides any GPU: the same on CI and on a GPU machine; run from another folder
    result = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path),
                                                            "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA GPU" in result.stdout
    assert os.listdir(tmp_path) == []  # no report
    broken = tmp_path / "python"  # an environment whose torch does not import fails, rather than pass unchecked
    broken.write_text("#!/bin/sh\nexec " + sys.executable + " -c 'raise ImportError(\"no torch\")'\n")
    broken.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHON": str(broken)})
    assert result.returncode == 1 and "does not import" in result.stdout and "no torch" in result.stderr


# Skipped without a CUDA GPU (CI has none): `bash .ci/gpu` runs them on a GPU machine and writes each
# one's result into gpu_report.md. On the GPU: bf16 autocast, fused AdamW, the data on the device, NCCL.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run .ci/gpu on a GPU machine)")


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """TINY_RUN trained on the GPU: bf16 autocast, frozen weights in bf16, fused AdamW, the data on the device."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    assert run_train(*TINY_RUN, "--device", "cuda", "--out", out) == 0
    return out


def _accuracy(printed):
    return float(re.search(r"test accuracy ([\d.]+)%", printed).group(1))


@cuda
def test_cuda_a_bf16_step_agrees_with_the_float32_cpu_step():
    """train_step under bf16 autocast with the frozen weights in bf16 (frozen_in_bf16) on CUDA against the plain
    float32 step on the CPU, same model and batch, adapter dropout 0 (no masks to differ). bf16 keeps 8 bits of
    mantissa (relative rounding 2^-9), so the two cannot agree bitwise. Tolerances: the loss within 1% (relative);
    every trainable tensor's gradient at cosine similarity above 0.99 with the float32 one, i.e. an error vector of up
    to ~14% of its norm. The CPU's own bf16 autocast, as a stand-in, gave a loss within 0.16% and cosines >= 0.9997
    (errors <= 2.3%) on this model, so the bounds leave a margin of about 6x, and wrong weights, a missed cast or a
    gradient lost to bf16 underflow still fail them."""
    torch.manual_seed(0)
    model = vit.vit_t16(num_classes=5, img_size=32, arc="arc", adapter_dropout=0.0).train()
    arc.mark_trainable(model)
    with torch.no_grad():  # the head and every ARC tensor non-zero: with c_att = 0 (its init) W_att gets no gradient
        for name in arc.arc_state_dict(model):
            model.get_parameter(name).normal_(0, 0.1)
    on_gpu = copy.deepcopy(model).cuda()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    losses, gradients = {}, {}
    for device, net in (("cpu", model), ("cuda", on_gpu)):
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device == "cuda")
        with train.frozen_in_bf16(net, enabled=device == "cuda"):
            assert net.blocks[0].attn.qkv.weight.dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
            loss = train.train_step(net, optimizer, params, images.to(device), labels.to(device), 1 / 8)
        losses[device] = loss.item()
        gradients[device] = {name: p.grad.float().cpu() for name, p in net.named_parameters() if p.requires_grad}
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-2)
    assert gradients["cpu"].keys() == gradients["cuda"].keys() and len(gradients["cpu"]) == 2 + 2 * 12 * 2 + 2
    for name, expected in gradients["cpu"].items():
        assert expected.norm() > 0, name
        cosine = torch.nn.functional.cosine_similarity(expected.flatten(), gradients["cuda"][name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())


@cuda
def test_cuda_the_training_loop_makes_no_host_sync():
    """What train.train does at each step (the learning rate, train_step, `losses[step] = ...`, the Loader's next batch
    of a Preloaded split and of an FGVC-like Resized split, both on the device; adapter dropout 0.1 drawing from the
    CUDA generator) under torch.cuda.set_sync_debug_mode("error"), which raises at any synchronizing call (.item(),
    .tolist(), .cpu(), a blocking copy, nonzero). Once an epoch, outside the check: the Loader's first batch, which
    copies the epoch's indices to the GPU and draws a Resized split's crops (their shapes read on the host). The first
    step ever (AdamW's state, normalize's constants) runs before. Exact: one sync anywhere fails."""
    import itertools
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = vit.vit_t16(num_classes=10, img_size=32, arc="arc").to(device).train()
    arc.mark_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    cfg, generator = SimpleNamespace(lr=1e-3, warmup_epochs=1, epochs=2), torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (24,), generator=generator)
    square = data.Preloaded(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=generator), labels)
    shapes = torch.tensor([[32 + k % 7, 32 + 3 * k % 11] for k in range(24)])  # (h, w), each at least the crop
    size = int((3 * shapes[:, 0] * shapes[:, 1]).sum())
    pixels = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
    resized = data.Resized(pixels, shapes, labels, 32)
    with train.frozen_in_bf16(model, True):
        train.train_step(model, optimizer, params, *next(data.Loader(square, device)([torch.arange(8)])), 1 / 8)
        for split in (square, resized):  # as train.train's loop, the batches drawn as the steps go
            loader = data.Loader(split, device)
            assert loader.split.labels.device.type == "cuda"  # the device path
            order = torch.randperm(24, generator=generator)
            indices, weights = train.shares(order, 8, SimpleNamespace(rank=0, world=1))
            losses, batches = torch.zeros(len(indices), device=device), loader(indices, seed=3)
            first = next(batches)  # once an epoch: the indices sent, the crops drawn
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with pytest.raises(RuntimeError, match="synchroniz"):  # the check is on
                    losses.sum().item()
                for step, (images, targets) in enumerate(itertools.chain([first], batches)):
                    for group in optimizer.param_groups:
                        group["lr"] = train.lr_at(step, cfg, len(indices))
                    losses[step] = train.train_step(model, optimizer, params, images, targets, weights[step])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert step == 2 and torch.isfinite(losses).all() and (losses > 0).all()


@cuda
def test_cuda_evaluation_and_eval_only_give_the_cpu_s_accuracy(cuda_run, capsys):
    """A run trained on CUDA: its own test (bf16, in the run), and --eval-only of adapters.pth and folded.pth on CUDA
    (bf16) and on the CPU (float32). The CPU's two agree exactly (as on CI). Each bf16 figure is within one test image
    (0.5 points of 200) of the CPU's: bf16 logits differ from float32 ones by ~0.4% of the largest (measured with the
    CPU's bf16 autocast), which can flip a near-tie, and 2 epochs leave a margin of more than 1 logit on most images."""
    logged = metrics(cuda_run)[-1]["test_acc"]
    accuracy = {}
    for device in ("cpu", "cuda"):
        for name in ("adapters.pth", "folded.pth"):
            assert run_train("--eval-only", "--checkpoint", cuda_run / name, "--workers", "0", "--device", device) == 0
            accuracy[device, name] = _accuracy(capsys.readouterr().out)
    one_image = 100 / (data.SYNTHETIC_CLASSES * data.SYNTHETIC_TEST)
    cpu = accuracy["cpu", "adapters.pth"]
    assert accuracy["cpu", "folded.pth"] == cpu and logged > 60
    for key, value in [*accuracy.items(), ("the run's own test", logged)]:
        assert abs(value - cpu) <= one_image + 1e-6, (key, value, cpu)


@cuda
def test_cuda_a_folded_model_trained_on_the_gpu_loads_on_the_cpu_with_the_gpu_s_logits(cuda_run):
    """folded.pth of the CUDA run (float32 tensors on the CPU) loads strictly into a plain vit_t16 on the CPU. Its
    float32 logits against the same model's on CUDA, and against the unfolded CUDA model (the frozen weights from the
    seed, adapters.pth): within 2e-3 of the largest logit. Float32 on both devices agrees to ~1e-6, but cuDNN may run a
    float32 convolution (the patch embedding) in TF32 (10-bit mantissa); a wrong fold moves logits by O(1). Under bf16
    autocast on CUDA: within 3e-2 (bf16 is ~0.4% off, measured on the CPU's bf16), the same class on all but at most
    one of the 64 images."""
    state = trained(cuda_run / "folded.pth")
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    plain = vit.vit_t16(num_classes=10, img_size=16).eval()
    plain.load_state_dict(state, strict=True)
    saved = torch.load(cuda_run / "adapters.pth", weights_only=True)
    unfolded = train.prepare_model(SimpleNamespace(**{**paper.DEFAULTS, **saved["config"]}), 10, None, log=print)
    runs.load_trained_tensors(unfolded, saved["state_dict"], "adapters.pth")
    images = data.normalize(data.build("synthetic", img_size=16, log=None).test.images[:64])
    with torch.no_grad():
        expected = plain(images)
        on_gpu = copy.deepcopy(plain).cuda()
        float32 = [on_gpu(images.cuda()).cpu(), unfolded.cuda().eval()(images.cuda()).cpu()]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = on_gpu(images.cuda()).float().cpu()
    scale = expected.abs().max()
    assert scale > 1
    for logits in float32:
        assert (logits - expected).abs().max() <= 2e-3 * scale
    assert (bf16 - expected).abs().max() <= 3e-2 * scale
    assert (bf16.argmax(-1) != expected.argmax(-1)).sum() <= 1


@cuda
def test_cuda_a_stopped_run_restores_the_cuda_random_state_and_resumes_to_the_same_weights(cuda_run, tmp_path,
                                                                                           monkeypatch, capsys):
    """Ctrl-C in epoch 2 of a CUDA run with adapter dropout 0.1 (its masks drawn from the CUDA generator), then
    --resume: checkpoint.pth holds the CUDA generator's state, resuming sets it, and the resumed run ends with the
    uninterrupted run's weights. Tolerance: CUDA kernels are not all deterministic (atomic adds in some backward
    kernels), and Adam can amplify a last-bit difference, so the resumed weights must be within a tenth of the
    difference that a lost CUDA state makes (the same resume with set_rng_state a no-op, which replays epoch 1's
    masks), not bitwise equal; on a deterministic GPU the gap is 0."""
    cut, unrestored = tmp_path / "cut", tmp_path / "unrestored"
    with monkeypatch.context() as patch:
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(17 + 5))  # 16 steps an epoch: epoch 2, step 5
        assert run_train(*TINY_RUN, "--device", "cuda", "--out", cut) == 128 + signal.SIGINT
    assert "stopped by SIGINT after 1 epoch(s)" in capsys.readouterr().err
    state = torch.load(cut / "checkpoint.pth", weights_only=True)["rng"][0]["cuda"]
    assert isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.numel() > 0
    shutil.copytree(cut, unrestored)
    restore, restored = torch.cuda.set_rng_state, []
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "set_rng_state",
                      lambda new, device="cuda": restored.append(new) or restore(new, device))
        assert run_train(*TINY_RUN, "--device", "cuda", "--out", cut, "--resume", cut) == 0
        assert any(torch.equal(new, state) for new in restored)
        patch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": None)
        assert run_train(*TINY_RUN, "--device", "cuda", "--out", unrestored, "--resume", unrestored) == 0
    straight, resumed, lost = (trained(out / "adapters.pth") for out in (cuda_run, cut, unrestored))
    gap = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    wrong = max((straight[k] - lost[k]).abs().max().item() for k in straight)
    assert wrong > 0 and gap <= wrong / 10, (gap, wrong)
    assert [m["epoch"] for m in metrics(cut)] == [1, 2]


@cuda
def test_cuda_swin_b_trains_a_bf16_step_at_224_px_and_folds_exactly():
    """Swin-B at 224 px (masked, shifted window attention: flash attention cannot take the mask) on CUDA: two bf16
    steps of train_step with the frozen weights in bf16, a finite loss and a non-zero gradient for every trainable
    tensor, the frozen weights back bitwise in float32. Then the fold: float32 logits of 4 images before and after
    arc.reparameterize within 1e-3 of the largest (train.py's own check, fold_and_compare); the adapters (randomised)
    move the logits by far more than that."""
    torch.manual_seed(0)
    model = swin.swin_b(num_classes=47, img_size=224, arc="arc").cuda().train()
    arc.mark_trainable(model)
    with torch.no_grad():  # c_att starts at 0: randomise the c_l and b_l so that both sides fold something
        for name in arc.arc_state_dict(model):
            if name.endswith((".scale", ".bias")) and "adapter" in name:
                model.get_parameter(name).normal_(0, 0.1)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 47, (8,), device="cuda")
    with train.frozen_in_bf16(model, True):
        assert model.layers[0].blocks[1].attn.qkv.weight.dtype == torch.bfloat16 and model.layers[0].blocks[1].shift
        losses = [train.train_step(model, optimizer, params, images, labels, 1 / 8) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    assert all(p.dtype == torch.float32 and torch.equal(p, frozen[name])
               for name, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    x = data.normalize(images[:4])
    with torch.no_grad():
        plain = copy.deepcopy(model)
        for name in arc.arc_state_dict(plain):
            if name.endswith((".scale", ".bias")) and "adapter" in name:
                plain.get_parameter(name).zero_()  # identity adapters: the backbone alone
        backbone, before = plain(x), model(x)
        after = arc.reparameterize(model)(x)
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-3 * scale
    assert (before - backbone).abs().max() > 1e-2 * scale


@cuda
def test_cuda_torchrun_trains_one_process_over_nccl(tmp_path):
    """torchrun --nproc_per_node=1 with --device cuda: train.py initialises NCCL (its control messages on gloo), sets
    its GPU from LOCAL_RANK, trains, folds and saves; exit 0 and the log names cuda:0."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             "train.py", *TINY_RUN, "--device", "cuda", "--out", str(out)], cwd=HERE,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cuda:0, bf16 autocast" in result.stdout, result.stdout[-2000:]
    assert [m["epoch"] for m in metrics(out)] == [1, 2] and (out / "folded.pth").exists()


@cuda
def test_cuda_frozen_weights_wait_in_host_memory_and_come_back_bitwise():
    """frozen_in_bf16 on ViT-B/16 on CUDA: inside, the GPU holds the frozen linear and conv weights in bf16 only (their
    float32 originals wait in host memory), so allocated memory falls by half their float32 size (171 MB), not rises
    by their bf16 size; after, it is back, and every parameter is float32 and bitwise its value before. Tolerance: a
    tenth of the float32 size (34 MB), for the caching allocator's rounding; the wrong outcomes differ by 5 tenths."""
    import gc
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = vit.vit_b16(num_classes=47, arc="arc")
    arc.mark_trainable(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                 for p in m.parameters(recurse=False) if not p.requires_grad) * 4  # float32 bytes
    assert frozen > 340e6  # 85.6M values
    gc.collect()
    gc.disable()  # no other test's CUDA tensors freed in between
    try:
        start = torch.cuda.memory_allocated(device)
        model.to(device)
        loaded = torch.cuda.memory_allocated(device) - start
        with train.frozen_in_bf16(model, True):
            inside = torch.cuda.memory_allocated(device) - start
        after = torch.cuda.memory_allocated(device) - start
    finally:
        gc.enable()
    assert loaded >= frozen
    assert abs(inside - (loaded - frozen / 2)) <= frozen / 10, (loaded, inside, frozen)
    assert abs(after - loaded) <= frozen / 10, (loaded, after)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cuda" and torch.equal(p.cpu(), before[name]), name


@cuda
def test_cuda_a_split_kept_in_host_memory_gives_the_device_path_s_batches_bitwise(tmp_path, monkeypatch):
    """The Loader's host path (a split too large for the GPU: gathered in host memory, sent pinned and non-blocking)
    against its device path, for an FGVC training split (random crops and flips from the epoch's seed) and a test
    split: bitwise the same uint8 batches and labels, on the GPU."""
    task, _ = fgvc_pictures(tmp_path)
    device, batches = torch.device("cuda"), [torch.tensor([4, 1]), torch.tensor([0, 3, 2]), torch.tensor([2, 2, 0, 1])]
    for split in (task.train, task.test):
        on_device = data.Loader(split, device)
        with monkeypatch.context() as patch:
            patch.setattr(data, "fits_on_device", lambda nbytes, device: False)
            from_host = data.Loader(split, device)
        assert on_device.split.labels.device.type == "cuda" and from_host.split.labels.device.type == "cpu"
        expected, got = list(on_device(batches, seed=5)), list(from_host(batches, seed=5))
        assert len(expected) == len(got) == 3
        for (images, labels), (host_images, host_labels) in zip(expected, got):
            assert host_images.device.type == host_labels.device.type == "cuda"
            assert torch.equal(images.cpu(), host_images.cpu()) and torch.equal(labels.cpu(), host_labels.cpu())


@cuda
def test_cuda_add_adapters_on_a_model_already_on_the_gpu():
    """add_adapters on a model already on the GPU: the adapters are made there too (else the first forward fails on
    a device mismatch), and they fold there. Tolerance: 1e-4 of the largest logit, float32 (TF32 convolutions)."""
    model = TimmStyleViT().cuda().eval()
    arc.add_adapters(model, rank=ARC_RANK)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    randomize_arc(model.cpu()).cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        adapted = model(images)
        assert (arc.reparameterize(model)(images) - adapted).abs().max() <= 1e-4 * adapted.abs().max()
