"""Fine-tune a ViT or Swin with ARC: train, test, fold the adapters into the weights, save.

    python train.py --data dtd                      # VTAB-1k DTD on ViT-B/16 (ImageNet-21k), the authors' recipe
    python train.py --data cub                      # an FGVC set, with its own lr, weight decay and dropouts
    python train.py --data vtab-1k                  # the 19 VTAB-1k tasks in turn, then results.md: the paper's table
    python train.py --data dtd --model vit_t16      # a laptop-sized run on real pretrained weights
    python train.py --resume runs/dtd_vit_b16_arc   # continue an interrupted run (with --epochs N: extend it)
    python train.py --eval-only --checkpoint runs/dtd_vit_b16_arc/adapters.pth
    torchrun --nproc_per_node=4 train.py --data dtd # several GPUs; --batch-size stays the global batch

A setting comes from the command line if given there; else, with --resume, from the run itself; else
from the authors' recipe for the task and model (what the official scripts ran; see the README). A
run's folder gets metrics.jsonl (a line an epoch), checkpoint.pth (every epoch), adapters.pth (the
trained tensors) and folded.pth (the plain model, adapters folded in); a suite gets a folder per task,
and results.md and results.json after each task.
"""
import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import arc
import data
import swin
import vit

MODELS = {name: getattr(module, name) for module, names in
          ((vit, ("vit_t16", "vit_s16", "vit_b16", "vit_l16", "vit_h14")), (swin, ("swin_t", "swin_s", "swin_b", "swin_l")))
          for name in names}

# ---------------------------------------------------------------------------------------------------
# The authors' recipes (ARC.md sections 3 and 7). DEFAULTS ends with the official VTAB-1k recipe on the
# ViT (vtab_ARC_train.py); the FGVC and Swin recipes change what they list.

DEFAULTS = dict(data="dtd", data_dir="./data", model="vit_b16", weights="auto", method="arc", rank=50, batch_size=32,
                epochs=100, img_size=224, seed=42, eval_every=10,
                lr=1e-2, weight_decay=0.0, warmup_epochs=10, adapter_dropout=0.1, vit_dropout=0.0, drop_path=0.0)
FGVC_RECIPES = {  # FGVC_ARC_train.py, the authors' settings per dataset
    "cub": dict(lr=1e-3, weight_decay=0.05, adapter_dropout=0.1, vit_dropout=0.1),
    "nabirds": dict(lr=2e-4, weight_decay=0.05, adapter_dropout=0.1, vit_dropout=0.1),
    "flowers": dict(lr=2.5e-3, weight_decay=0.01, adapter_dropout=0.1, vit_dropout=0.1),
    "dogs": dict(lr=2.5e-4, weight_decay=0.05, adapter_dropout=0.1, vit_dropout=0.0),
    "cars": dict(lr=5e-3, weight_decay=0.05, adapter_dropout=0.0, vit_dropout=0.1),
}
# train_ARC_swin.py with Model/ARC_swin_b.py: drop-path 0.1, and adapter dropout 0.5 (the blocks' default)
# in every run, as the per-task 'a_drop' it prints never reaches the model. Its lr and weight decay per task:
SWIN_RECIPE = dict(adapter_dropout=0.5, drop_path=0.1)
SWIN_VTAB = {
    "cifar": (5e-3, 1e-2), "caltech101": (3e-3, 5e-2), "dtd": (5e-3, 5e-2), "oxford_flowers102": (5e-3, 5e-5),
    "oxford_iiit_pet": (1e-2, 5e-2), "svhn": (1e-2, 5e-2), "sun397": (5e-3, 5e-5), "patch_camelyon": (5e-3, 5e-5),
    "eurosat": (3e-3, 0.0), "resisc45": (1e-2, 0.0), "diabetic_retinopathy": (5e-3, 5e-5), "clevr_count": (2e-3, 5e-2),
    "clevr_dist": (1e-3, 5e-2), "dmlab": (5e-3, 1e-2), "kitti": (1e-2, 0.0), "dsprites_loc": (1e-2, 0.0),
    "dsprites_ori": (5e-3, 0.0), "smallnorb_azi": (1e-2, 5e-3), "smallnorb_ele": (1e-3, 5e-2),
}
RECIPE_KEYS = ("lr", "weight_decay", "warmup_epochs", "adapter_dropout", "vit_dropout", "drop_path")
RUN_KEYS = ("data", "model", "weights", "method", "rank", "batch_size", "epochs", "img_size", "seed", *RECIPE_KEYS)


def recipe(task, model):
    """(name, settings) of the authors' recipe for `task` on `model`."""
    vtab = {key: DEFAULTS[key] for key in RECIPE_KEYS}
    if model.startswith("swin"):
        lr, weight_decay = SWIN_VTAB.get(task, (vtab["lr"], vtab["weight_decay"]))
        name = "Swin VTAB-1k" if task in SWIN_VTAB else f"Swin (no official {task} run: VTAB-1k's lr and weight decay)"
        return f"{name} (train_ARC_swin.py)", {**vtab, **SWIN_RECIPE, "lr": lr, "weight_decay": weight_decay}
    if task in FGVC_RECIPES:
        return f"FGVC {task} (FGVC_ARC_train.py)", {**vtab, **FGVC_RECIPES[task]}
    return "VTAB-1k (vtab_ARC_train.py)", vtab


def settings(given, saved=None):
    """The run's settings, each with where it came from: the command line, the run being resumed, the
    recipe for its task and model, or DEFAULTS."""
    first = lambda key: given.get(key, (saved or DEFAULTS)[key])
    recipe_name, recipe_values = recipe(first("data"), first("model"))
    cfg, sources = {}, {}
    for key in DEFAULTS:
        cfg[key], sources[key] = next((values[key], source) for source, values in (
            ("command line", given), ("run", saved or {}), ("recipe", recipe_values), ("default", DEFAULTS))
            if key in values)
    unused = "drop_path" if cfg["model"].startswith("vit") else "vit_dropout"  # each model has one of the two
    if given.get(unused):
        raise UserError(f"--{flag(unused)} does not apply to {cfg['model']}: --vit-dropout is for ViTs, "
                        f"--drop-path for Swin")
    cfg[unused], sources[unused] = 0.0, "n/a"
    if 0 < cfg["epochs"] <= cfg["warmup_epochs"] and sources["warmup_epochs"] != "run":
        if sources["warmup_epochs"] == "command line":
            raise UserError(f"--warmup-epochs {cfg['warmup_epochs']} must be less than --epochs {cfg['epochs']}, "
                            f"or the learning rate never decays")
        cfg["warmup_epochs"], sources["warmup_epochs"] = cfg["epochs"] // 10, "shortened to a tenth of --epochs"
    return SimpleNamespace(**cfg), sources, recipe_name


# ---------------------------------------------------------------------------------------------------
# Options


class UserError(Exception):
    """A mistake in the command, the data or the files: reported as one line, without a traceback."""


def flag(key):
    return key.replace("_", "-")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help gives each option's default, or says that the task's recipe sets it."""

    def _get_help_string(self, action):
        if action.dest in RECIPE_KEYS:
            return f"{action.help} (default: the task's recipe)"
        default = DEFAULTS.get(action.dest, action.default)
        return action.help if default in (None, False, argparse.SUPPRESS) else f"{action.help} (default: {default})"


def parse_args(argv=None):
    """The options, and the settings among them that the command line gave (paths made absolute, so that a
    run resumed or tested from another folder finds what it used)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (python train.py --help lists the options)")
    add = lambda name, help, **kw: p.add_argument(name, help=help, **kw)
    add("--data", f"a VTAB-1k task ({' '.join(data.VTAB_TASKS)}); an FGVC set ({' '.join(data.FGVC_TASKS)}); a suite "
        f"({' '.join(data.SUITES)}) or a comma-separated list of tasks; a folder of train/ and test/ class folders; "
        f"synthetic")
    add("--data-dir", "where datasets are looked for (vtab-1k/<task>, fgvc/<set>, dtd/) and downloaded")
    add("--model", "the backbone", choices=sorted(MODELS))
    add("--weights", "auto (the checkpoint the official runs used, downloaded into torch hub's cache), a path, or none")
    add("--method", "what trains", choices=["arc", "arc_att", "linear", "full"])
    add("--rank", "ARC bottleneck r", type=int)
    add("--adapter-dropout", "dropout on the adapters' bottleneck: 0.1 on ViTs, 0.5 on Swin", type=float)
    add("--vit-dropout", "ViT dropout after the position embedding and in the MLP: 0 on VTAB-1k", type=float)
    add("--drop-path", "Swin stochastic depth at the last block, rising from 0 at the first: 0.1", type=float)
    add("--lr", "AdamW peak learning rate: 0.01 on VTAB-1k with a ViT", type=float)
    add("--weight-decay", "AdamW weight decay: 0 on VTAB-1k with a ViT", type=float)
    add("--batch-size", "global batch, over all processes", type=int)
    add("--epochs", "training epochs", type=int)
    add("--warmup-epochs", "linear warm-up, then cosine decay, per step: 10", type=int)
    add("--img-size", "input resolution", type=int)
    add("--seed", "the same seed on the same CPU gives the same run", type=int)
    add("--eval-every", "test every N epochs, and after the last", type=int)
    add("--out", "output folder (default: runs/<data>_<model>_<method>)")
    add("--device", "cpu, cuda or cuda:N", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--workers", "image decoding processes", type=int, default=min(8, os.cpu_count() or 1))
    add("--resume", "the folder of a run or suite to continue")
    add("--eval-only", "test --checkpoint (an adapters.pth or folded.pth)", action="store_true")
    add("--checkpoint", "for --eval-only")
    args = p.parse_args(argv)
    for keys, ok, rule in ((("rank", "batch_size", "epochs", "img_size", "eval_every"), lambda v: v >= 1, "at least 1"),
                           (("warmup_epochs", "workers"), lambda v: v >= 0, "at least 0"),
                           (("lr", "weight_decay"), lambda v: 0 <= v <= 10, "a number from 0 to 10 (recipes: 0 to 0.05)"),
                           (("adapter_dropout", "vit_dropout", "drop_path"), lambda v: 0 <= v < 1, "a rate in [0, 1)")):
        for key in keys:
            if getattr(args, key) is not None and not ok(getattr(args, key)):  # `not ok`: nan fails every test
                p.error(f"--{flag(key)} {getattr(args, key)} must be {rule}")
    try:
        device_type = torch.device(args.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        p.error(f"--device {args.device} is not a device this script runs on: cpu, cuda or cuda:N")
    if device_type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.eval_only != bool(args.checkpoint):
        p.error("--eval-only and --checkpoint go together: --eval-only --checkpoint runs/<run>/adapters.pth")
    if args.resume and args.out and os.path.abspath(args.out) not in (os.path.abspath(args.resume),
                                                                        os.path.dirname(os.path.abspath(args.resume))):
        p.error(f"--resume {args.resume} and --out {args.out} name different runs: give one of them")
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    if args.weights not in (None, "auto", "none"):
        args.weights = os.path.abspath(args.weights)
    if args.data and data.is_path(args.data):
        args.data = os.path.abspath(args.data)
    return args, {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}


# ---------------------------------------------------------------------------------------------------
# Model and weights


def build_model(cfg, num_classes):
    kw = dict(dropout=cfg.vit_dropout) if cfg.model.startswith("vit") else dict(drop_path=cfg.drop_path)
    try:
        return MODELS[cfg.model](num_classes=num_classes, img_size=cfg.img_size, rank=cfg.rank, **kw,
                                 arc=cfg.method if cfg.method in ("arc", "arc_att") else None,
                                 adapter_dropout=cfg.adapter_dropout)
    except ValueError as e:
        raise UserError(f"--img-size {cfg.img_size} does not suit --model {cfg.model}: {e}") from None


def check_data(cfg):
    """Whether the data is there is cheap to learn: before anything is downloaded or decoded."""
    where = data.missing(cfg.data, cfg.data_dir)
    if where:
        raise UserError(f"no {cfg.data} data: looked in {where} (see --data-dir)")


def weights_file(weights, model_name):
    """The file --weights names (None for 'none'); 'auto' downloads the published checkpoint once into
    torch hub's cache."""
    if weights in ("none", None):
        return None
    if weights != "auto":
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: {'a folder, not a file' if os.path.isdir(weights) else 'no such file'}")
        return weights
    url, path = auto_weights(model_name)
    if not os.path.exists(path):
        print(f"downloading {url}\n         to {path}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)  # writes a temporary file, then renames
        except OSError as e:
            raise UserError(f"--weights auto: cannot write torch hub's cache {os.path.dirname(path)} ({e.strerror}): "
                            f"set TORCH_HOME to a folder you can write, or download {url} and pass --weights PATH") from None
        except Exception as e:
            raise UserError(f"could not download the {model_name} weights ({type(e).__name__}: {e}). Looked for "
                            f"{path}: download {url} by hand and put it there, or pass --weights PATH") from None
    return path


def auto_weights(model_name):
    """(URL, path in torch hub's cache) of the published checkpoint the official runs started from."""
    url = {**vit.URLS, **swin.URLS}[model_name]
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def load_weights(model, cfg, path):
    try:
        if path:
            (vit if cfg.model.startswith("vit") else swin).load_pretrained(model, path)
    except arc.CheckpointError as e:
        advice = ("; --weights auto downloaded it: delete it, and the next run downloads it again"
                  if cfg.weights == "auto" else "")
        raise UserError(f"--weights {e}{advice}") from None


def prepare_model(cfg, num_classes, weights):
    """The model of `cfg` with its pretrained weights, and only what its method trains trainable."""
    torch.manual_seed(cfg.seed)  # with --weights none the frozen backbone is the seed's random init
    model = build_model(cfg, num_classes)
    load_weights(model, cfg, weights)
    mark_trainable(model, cfg.method)
    return model


def mark_trainable(model, method):
    if method in ("arc", "arc_att"):
        return arc.mark_trainable(model)
    for name, param in model.named_parameters():
        param.requires_grad_(method == "full" or name.startswith("head."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_tensors(model):
    """What the method trains (for ARC: arc.arc_state_dict); linear and full train other tensors."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trained_tensors(model, state_dict, source):
    expected = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in state_dict.items()
             if k in expected and v.shape != expected[k]]
    if expected.keys() != state_dict.keys() or wrong:
        raise UserError(f"{source} does not fit this model: missing {sorted(expected.keys() - state_dict.keys())[:4]}, "
                        f"unexpected {sorted(state_dict.keys() - expected.keys())[:4]}, shapes (file vs model) {wrong[:2]}")
    model.load_state_dict(state_dict, strict=False)


@contextlib.contextmanager
def frozen_in_bf16(model, enabled):
    """Keep the frozen weights of linear and conv layers in bf16 while training on CUDA: autocast caches its
    casts only of tensors that require grad, and would cast these ~86M values again at every forward. The
    result is the same (autocast runs those layers in bf16 anyway); the float32 originals come back on exit,
    for folding."""
    frozen = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and enabled
              for p in m.parameters(recurse=False) if not p.requires_grad]
    originals = [p.data for p in frozen]
    for p in frozen:
        p.data = p.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for p, original in zip(frozen, originals):
            p.data = original


# ---------------------------------------------------------------------------------------------------
# The step, the schedule, evaluation


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(step, cfg, steps_per_epoch):
    """The official schedule: linear warm-up, then cosine decay to 0 at the last step."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_step(net, optimizer, params, images, labels, weight):
    """Forward, backward, clip, AdamW. Returns the loss as a device tensor: no host sync here."""
    with autocast(images.device):
        loss = F.cross_entropy(net(data.normalize(images)), labels, reduction="sum") * weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()


def shares(order, batch_size, ctx):
    """This process's share of each global batch of `order` (the same order on every process), and the weight
    that makes its summed loss its part of the batch mean: DDP's average of the gradients is then exactly the
    one-process gradient. A share that would be empty (a short last batch) is one image at weight 0: the
    process still takes part in DDP's step, and no kernel is given an empty batch."""
    indices, weights = [], []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        share = batch[ctx.rank::ctx.world]
        indices.append(share if len(share) else batch[:1])
        weights.append(ctx.world / len(batch) if len(share) else 0.0)
    return indices, weights


@torch.no_grad()
def evaluate(model, loader, batch_size, ctx):
    """Test accuracy in %, counted on the device and summed over processes."""
    model.eval()
    indices, weights = shares(torch.arange(len(loader)), batch_size, ctx)
    counts = torch.zeros(2, device=ctx.device)  # correct, total: one host sync at the end
    for images, labels in loader([i for i, w in zip(indices, weights) if w]):
        with autocast(ctx.device):
            counts[0] += (model(data.normalize(images)).argmax(-1) == labels).sum()
        counts[1] += len(labels)
    if ctx.world > 1:
        dist.all_reduce(counts)
    model.train()
    return round(100 * (counts[0] / counts[1]).item(), 2)


class LossMeter:
    """An epoch's mean loss and its first step with a nan or infinite loss, kept on the device: read once."""

    def __init__(self, ctx, steps):
        self.ctx, self.steps = ctx, steps
        self.sum, self.first_bad = torch.zeros((), device=ctx.device), torch.tensor(steps, device=ctx.device)

    def add(self, step, loss):
        self.sum += loss / self.ctx.world  # each process's loss is its share of the batch mean, times world
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=step))

    def mean(self, epoch, out):
        if self.ctx.world > 1:
            dist.all_reduce(self.sum)
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MIN)
        total, first_bad = torch.stack([self.sum, self.first_bad.float()]).tolist()  # the epoch's one host sync
        if first_bad < self.steps:
            raise UserError(f"the loss became nan or infinite at epoch {epoch + 1}, step {int(first_bad) + 1}; the last "
                            f"good checkpoint ({out}/checkpoint.pth) is untouched. Try a lower --lr")
        return round(total / self.steps, 5)


LONG_RUN_S = 3600  # on a CPU, a run longer than this gets advice


class Pace:
    """After the first steps, one line: how long the steps to go will take, and, when that is long on a CPU,
    what would be quicker. The first step pays for start-up, so the five after it are timed."""

    def __init__(self, ctx, steps_to_go):
        self.ctx, self.steps_to_go, self.done = ctx, steps_to_go, 0

    def step(self):
        self.done += 1
        if self.done in (1, 6) and self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)  # twice a run: the clock needs the GPU's work done
        if self.done == 1:
            self.start = time.time()
        elif self.done == 6:
            per_step = (time.time() - self.start) / 5
            seconds = per_step * (self.steps_to_go - 6)
            advice = ("; that is long: for a quick run try --model vit_t16, or a GPU with --device cuda"
                      if self.ctx.device.type == "cpu" and seconds > LONG_RUN_S else "")
            self.ctx.log(f"{per_step:.2f} s a step: about {fmt_time(seconds)} for the {self.steps_to_go - 6:,} steps "
                         f"to go, without testing{advice}")


# ---------------------------------------------------------------------------------------------------
# Processes, files, stop requests


def setup_distributed(device_name, workers):
    """Where this process runs. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process.
    Under torchrun a second, CPU (gloo) group carries control messages: stop requests and barriers that may
    wait out a download, without a GPU sync or NCCL's timeout. Only the first process logs."""
    ctx = SimpleNamespace(device=torch.device(device_name), rank=0, world=1, control=None, workers=workers, log=print)
    if "RANK" in os.environ:
        cuda = device_name.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        ctx.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
        ctx.log = print if ctx.rank == 0 else (lambda *a, **k: None)
    return ctx


def node_first(ctx, fn, *args):
    """fn(*args) on each machine's first process, then on its others: a download into a shared folder
    happens once, and the others find it done."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    result = fn(*args) if first else None
    if ctx.control is not None:
        dist.barrier(group=ctx.control)
    return result if first else fn(*args)


def save_atomic(obj, path):
    """Text, or what torch.save takes, to a temporary file that then replaces `path`: an interruption or a
    full disk never leaves a half-written file."""
    try:
        if isinstance(obj, str):
            with open(path + ".tmp", "w") as f:
                f.write(obj)
        else:
            torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise UserError(f"could not write {path} ({getattr(e, 'strerror', None) or e}); what was there is intact") from None


def read_saved(path, option, keys, what):
    """A file train.py wrote, holding at least the entries `keys`; `what` names the kind expected."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file") from None
    except Exception:
        raise UserError(f"{option} {path} is unreadable: it is {arc.describe_file(path)}") from None
    if not isinstance(saved, dict) or not set(keys) <= saved.keys():
        raise UserError(f"{option} {path} is not {what} written by train.py")
    return saved


def check_out(out, fresh):
    """Fail now, not after an hour of decoding, when the output folder holds a run that a fresh one would
    overwrite, or cannot be made or written."""
    if fresh and any(os.path.exists(os.path.join(out, name)) for name in ("checkpoint.pth", "adapters.pth", "folded.pth",
                                                                           "suite.json")):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or pass another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: pass another --out")
    parent = os.path.abspath(out)
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise UserError(f"--out {out}: {parent} is a file, so no folder can be made there; pass another --out")
        parent = os.path.dirname(parent)
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))  # what os.access cannot tell: a read-only mount, sysfs, a full disk
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {parent} ({e.strerror}); pass another --out") from None


class StopFlag:
    """While training, the first Ctrl-C or SIGTERM asks for a stop at the next step; a second stops at once."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def is_set(self, control_group):
        if control_group is None:
            return bool(self.signum)
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group)  # on the CPU: no GPU sync
        self.signum = int(flag)
        return bool(self.signum)


class Interrupted(Exception):
    def __init__(self, signum, epochs_done):
        super().__init__(f"stopped by {signal.Signals(signum).name} after {epochs_done} epoch(s)")
        self.exit_code, self.epochs_done = 128 + signum, epochs_done


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


# ---------------------------------------------------------------------------------------------------
# A run: its state, the loop, the end


class Run(SimpleNamespace):
    """One run's state: ctx (where this process runs), cfg (settings), out (its folder), model, task,
    optimizer, history (a metrics dict per finished epoch), seconds (where the time went)."""

    def save(self):
        """checkpoint.pth, then metrics.jsonl rewritten from the same history: killed between the two, the
        run resumes from the checkpoint and writes the log again, so every epoch has exactly one line."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.ctx.device)
               if self.ctx.device.type == "cuda" else None}
        states = [rng]
        if self.ctx.world > 1:  # every process's random state (its dropout), gathered: a collective
            states = [None] * self.ctx.world
            dist.all_gather_object(states, rng, group=self.ctx.control)
        if self.ctx.rank == 0:
            save_atomic({"config": vars(self.cfg), "trained": trained_tensors(self.model), "rng": states,
                         "optimizer": self.optimizer.state_dict(), "history": self.history}, self.path("checkpoint.pth"))
            save_atomic("".join(json.dumps(m) + "\n" for m in self.history), self.path("metrics.jsonl"))

    def restore(self, checkpoint):
        load_trained_tensors(self.model, checkpoint["trained"], self.path("checkpoint.pth"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        rng = checkpoint["rng"][self.ctx.rank]
        torch.set_rng_state(rng["cpu"])
        if self.ctx.device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)
        self.history = checkpoint["history"]
        if checkpoint["config"]["epochs"] != self.cfg.epochs:
            self.history[-1]["schedule"] = f"then extended from {checkpoint['config']['epochs']} to {self.cfg.epochs} epochs"
            self.ctx.log(f"extending the run: the cosine schedule is recomputed for {self.cfg.epochs} epochs")
        self.ctx.log(f"resuming {self.out} after epoch {len(self.history)}")

    def path(self, name):
        return os.path.join(self.out, name)


def run_task(given, out, ctx, resume=None, task=None):
    """One run into `out`, fresh or continued from `resume` (a folder or its checkpoint.pth); returns its result.
    The cheap checks come first (settings, the folder, the data's presence), then the weights (perhaps a
    download), then the data (decoding). `task`: a data.Task to use instead of --data (bench.py)."""
    started = time.time()
    checkpoint = read_checkpoint(resume, ctx.world) if resume else None
    cfg, sources, recipe_name = settings(given, checkpoint and checkpoint["config"])
    if checkpoint:
        check_resume(given, checkpoint["config"], len(checkpoint["history"]), out)
    check_out(out, fresh=not checkpoint)
    with torch.device("meta"):  # the options against the model, before any data is decoded
        build_model(cfg, num_classes=1)
    ctx.log(f"{cfg.data}: {cfg.model} {cfg.method}, {recipe_name} recipe; " + ", ".join(
        f"{key} {getattr(cfg, key)} ({sources[key]})" for key in RUN_KEYS[4:] if sources[key] != "n/a"))
    done = finished(out)
    if checkpoint and done and done["epochs"] == cfg.epochs == len(checkpoint["history"]):
        ctx.log(f"{out} has finished its {cfg.epochs} epochs (--resume with more --epochs trains it for longer)")
        return done["result"]
    if task is None:
        check_data(cfg)
    weights = node_first(ctx, weights_file, cfg.weights, cfg.model)  # a download comes before the decoding
    cfg.weights_bytes = os.path.getsize(weights) if weights else 0
    task = task or node_first(ctx, data.build, cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    cfg.classes = task.classes
    if checkpoint and checkpoint["config"]["classes"] != task.classes:
        raise UserError(f"--resume {out}: the run was trained on {len(checkpoint['config']['classes'])} classes "
                        f"{checkpoint['config']['classes'][:5]}, the data has {task.num_classes} {task.classes[:5]}")
    model = prepare_model(cfg, task.num_classes, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    ctx.log(f"{task.description}\n{cfg.model} {cfg.method}: {sum(p.numel() for p in params):,} trainable parameters; "
            f"{ctx.world} process(es) on {ctx.device}{', bf16 autocast' if ctx.device.type == 'cuda' else ''}; "
            f"output in {out}")
    if ctx.rank == 0:
        os.makedirs(out, exist_ok=True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=ctx.device.type == "cuda")
    run = Run(ctx=ctx, cfg=cfg, out=out, model=model.to(ctx.device), task=task, params=params, optimizer=optimizer,
              history=[], seconds={"setup": time.time() - started})
    if checkpoint:
        run.restore(checkpoint)
    train(run)
    return finish(run)


def finished(out):
    """The record of the finished run in `out` (its adapters.pth config, written last), or None."""
    if not all(os.path.exists(os.path.join(out, name)) for name in ("adapters.pth", "folded.pth")):
        return None
    return read_saved(os.path.join(out, "adapters.pth"), "--resume", ("config",), "an adapters.pth")["config"]


def run_folder(path):
    """The run (or suite) folder that --resume names: the folder itself, or the folder of a file in it."""
    return path if os.path.isdir(path) else os.path.dirname(path)


def read_checkpoint(path, world):
    """The checkpoint.pth of the run folder --resume names (or that file itself)."""
    folder = run_folder(path)
    path = os.path.join(path, "checkpoint.pth") if folder == path else path
    if not os.path.exists(folder):
        raise UserError(f"--resume {folder}: no such folder")
    if not os.path.exists(path):
        raise UserError(f"--resume {folder}: no checkpoint.pth there, so no finished epoch to continue; start the "
                        f"run again without --resume")
    checkpoint = read_saved(path, "--resume", ("config", "trained", "optimizer", "rng", "history"),
                            "a checkpoint.pth (adapters.pth and folded.pth hold results, not a run to continue)")
    if len(checkpoint["rng"]) != world:
        raise UserError(f"--resume: {path} was written by {len(checkpoint['rng'])} process(es); resume it with as "
                        f"many (torchrun --nproc_per_node={len(checkpoint['rng'])} for several)")
    return checkpoint


def check_resume(given, saved, done, out):
    """A run continues with its own settings. The command line may say where its files are now, how often to
    test, and --epochs, which may grow: the schedule is then recomputed for the new length."""
    changed = [key for key in RUN_KEYS if key in given and given[key] != saved[key] and key not in ("epochs", "weights")
               and not (key == "data" and data.is_path(given[key]) and data.is_path(saved[key]))]
    if changed:
        raise UserError(f"--resume {out} comes from another run: " + ", ".join(
            f"--{flag(key)} {saved[key]} there, {given[key]} here" for key in changed)
            + "; give the same options, or start a new run with another --out")
    if given.get("epochs", saved["epochs"]) < saved["epochs"]:
        raise UserError(f"--resume {out} is a run of {saved['epochs']} epochs ({done} done): --epochs "
                        f"{given['epochs']} would shorten it; a run can only be extended")
    check_weights(given, saved, f"--resume {out}")


def check_weights(given, saved, what):
    """A run continues, or is tested, with its own weights: --weights may say where they are now (the same
    file, so the same size), not name others."""
    weights = given.get("weights")
    path = auto_weights(saved["model"])[1] if weights == "auto" else weights
    size = 0 if weights == "none" else os.path.getsize(path) if path and os.path.isfile(path) else None
    if size is not None and size != saved["weights_bytes"]:
        describe = lambda name, n: f"{name} ({n:,} bytes)" if n else name
        raise UserError(f"{what}: --weights {describe(saved['weights'], saved['weights_bytes'])} there, "
                        f"{describe(weights, size)} here; give the run's own weights")


# Buffers (Swin's masks) are rebuilt alike by every process, so DDP need not sync them at each forward.
# torch 2.13 renamed the option.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})


def train(run):
    """The loop: for each epoch, for each batch: learning rate, forward, loss, backward, clip, step; then
    test, save and log."""
    ctx, cfg, model, optimizer = run.ctx, run.cfg, run.model, run.optimizer
    net = model if ctx.world == 1 else DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **NO_BUFFER_SYNC)
    train_data, test_data = (data.Loader(split, ctx.device, ctx.workers) for split in (run.task.train, run.task.test))
    steps = math.ceil(len(train_data) / cfg.batch_size)
    pace = Pace(ctx, (cfg.epochs - len(run.history)) * steps)
    with StopFlag() as stop, frozen_in_bf16(model, ctx.device.type == "cuda"):
        for epoch in range(len(run.history), cfg.epochs):
            started, loss = time.time(), LossMeter(ctx, steps)
            order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            indices, weights = shares(order, cfg.batch_size, ctx)
            for step, (images, labels) in enumerate(train_data(indices, seed=cfg.seed * 1000 + epoch)):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps + step, cfg, steps)
                loss.add(step, train_step(net, optimizer, run.params, images, labels, weights[step]))
                pace.step()
                if stop.is_set(ctx.control):
                    raise Interrupted(stop.signum, epoch)
            epoch_loss = loss.mean(epoch, run.out)  # the epoch's one host sync: the GPU's work is done, timed
            seconds = time.time() - started
            metrics = {"epoch": epoch + 1, "loss": epoch_loss, "lr": optimizer.param_groups[0]["lr"],
                       "train_s": round(seconds, 2), "images_per_s": round(len(train_data) / seconds, 1)}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics["test_acc"] = evaluate(model, test_data, 4 * cfg.batch_size, ctx)
                metrics["test_s"] = round(time.time() - started - metrics["train_s"], 2)
            metrics["elapsed_s"] = round(time.time() - started + (run.history[-1]["elapsed_s"] if run.history else 0), 1)
            run.history.append(metrics)
            run.save()
            log_epoch(ctx, metrics, cfg.epochs)
            if stop.is_set(ctx.control) and epoch + 1 < cfg.epochs:
                raise Interrupted(stop.signum, epoch + 1)


def log_epoch(ctx, metrics, epochs):
    eta = metrics["elapsed_s"] / metrics["epoch"] * (epochs - metrics["epoch"])
    ctx.log(f"epoch {metrics['epoch']:3d}/{epochs}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:7.1f} img/s  elapsed {fmt_time(metrics['elapsed_s'])}  eta {fmt_time(eta)}"
            + (f"  test {metrics['test_acc']:.2f}%" if "test_acc" in metrics else ""))


def finish(run):
    """adapters.pth; the adapters folded into the weights, checked on test images; folded.pth; a summary.
    Returns the result: final and best accuracy, trainable parameters, seconds."""
    started, tested = time.time(), [m["test_acc"] for m in run.history if "test_acc" in m]
    result = {"final": tested[-1], "best": max(tested), "trainable": sum(p.numel() for p in run.params),
              "seconds": {"setup": round(run.seconds["setup"], 1),
                          "training": round(sum(m["train_s"] for m in run.history), 1),
                          "testing": round(sum(m.get("test_s", 0) for m in run.history), 1)}}
    trained = trained_tensors(run.model)
    if run.cfg.method in ("arc", "arc_att"):
        run.ctx.log(fold_and_compare(run.model, data.Loader(run.task.test, run.ctx.device, run.ctx.workers)))
    result["seconds"]["finish"] = round(time.time() - started, 1)
    record = {**vars(run.cfg), "result": result}
    if run.ctx.rank == 0:  # folded.pth: the plain architecture, whatever the method (--eval-only reads it so)
        save_atomic({"config": {**record, "method": "folded", "trained_with": run.cfg.method},
                     "state_dict": {k: v.cpu() for k, v in run.model.state_dict().items()}}, run.path("folded.pth"))
        save_atomic({"config": record, "state_dict": trained}, run.path("adapters.pth"))  # last: the run is done
        run.ctx.log(f"summary: {run.cfg.model} {run.cfg.method} on {run.cfg.data}: {result['trainable']:,} trainable "
                    f"parameters, final test accuracy {result['final']:.2f}%, best over evaluated epochs "
                    f"{result['best']:.2f}% (selected on the test set, as the official code reports), "
                    f"{fmt_time(run.history[-1]['elapsed_s'])} training and testing\nsaved {run.path('adapters.pth')} "
                    f"({os.path.getsize(run.path('adapters.pth')) / 1e6:.2f} MB) and {run.path('folded.pth')}")
    return result


@torch.no_grad()
def fold_and_compare(model, loader, n=64):
    """Fold the adapters into the weights, comparing float32 logits of the first n test images before and
    after: cheaper than testing twice, and no bf16 near-tie can hide or fake a difference."""
    model.eval()
    images = data.normalize(next(loader([torch.arange(min(n, len(loader)))]))[0])
    before = model(images)
    arc.reparameterize(model)
    gap, scale = torch.stack([(model(images) - before).abs().max(), before.abs().max()]).tolist()
    agree = "(they agree)" if gap <= 1e-3 * scale + 1e-5 else "MISMATCH: please report this"
    return (f"adapters folded into the weights: float32 logits of {len(images)} test images within {gap:.1e} of the "
            f"unfolded model's (largest {scale:.2f}) {agree}")


def eval_only(args, given, ctx):
    """Rebuild the model a checkpoint records and test it; the command line may say where its data and
    weights are now."""
    saved = read_saved(args.checkpoint, "--checkpoint", ("config", "state_dict"), "an adapters.pth or folded.pth")
    cfg = SimpleNamespace(**{**saved["config"], **{k: v for k, v in given.items() if k in ("data_dir", "weights")}})
    cfg.data = given["data"] if "data" in given and data.is_path(cfg.data) else cfg.data
    check_data(cfg)
    if cfg.method == "folded":
        model = build_model(SimpleNamespace(**{**vars(cfg), "method": "full"}), len(cfg.classes))
        try:
            model.load_state_dict(saved["state_dict"])
        except RuntimeError as e:
            raise UserError(f"--checkpoint {args.checkpoint} does not fit {cfg.model}: "
                            f"{' '.join(str(e).split())[:300]}") from None
    else:
        if cfg.weights not in ("auto", "none") and not os.path.isfile(cfg.weights):
            raise UserError(f"--checkpoint {args.checkpoint} was trained from --weights {cfg.weights}, which is not "
                            f"there now: pass --weights with where it is")
        check_weights(given, saved["config"], f"--checkpoint {args.checkpoint}")
        model = prepare_model(cfg, len(cfg.classes), weights_file(cfg.weights, cfg.model))
        load_trained_tensors(model, saved["state_dict"], args.checkpoint)
    task = data.build(cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    if task.classes != cfg.classes:
        raise UserError(f"--checkpoint {args.checkpoint} was trained on {len(cfg.classes)} classes {cfg.classes[:5]}, "
                        f"the data has {task.num_classes} {task.classes[:5]}")
    accuracy = evaluate(model.to(ctx.device), data.Loader(task.test, ctx.device, ctx.workers), 4 * cfg.batch_size, ctx)
    ctx.log(f"{args.checkpoint}: {cfg.model} {cfg.method} on {cfg.data}: test accuracy {accuracy:.2f}%")
    return accuracy


# ---------------------------------------------------------------------------------------------------
# Suites: the paper's tables


PAPER = {  # the ARC paper's ViT-B/16 accuracies (ARC.md section 4), shown beside vit_b16 arc results
    "cifar": 72.2, "caltech101": 90.1, "dtd": 72.7, "oxford_flowers102": 99.0, "oxford_iiit_pet": 91.0, "svhn": 91.9,
    "sun397": 54.4, "patch_camelyon": 84.9, "eurosat": 95.7, "resisc45": 86.7, "diabetic_retinopathy": 75.8,
    "clevr_count": 80.7, "clevr_dist": 67.1, "dmlab": 48.7, "kitti": 81.6, "dsprites_loc": 79.2, "dsprites_ori": 51.0,
    "smallnorb_azi": 31.4, "smallnorb_ele": 39.9, "cub": 88.5, "nabirds": 85.3, "flowers": 99.3, "dogs": 91.9,
    "cars": 85.7,
}


def suite_tasks(name):
    """The tasks of a suite (vtab-1k, fgvc) or of a comma-separated list; None for a single task."""
    return data.SUITES.get(name) or ([t.strip() for t in name.split(",") if t.strip()] if "," in name else None)


def run_suite(given, out, ctx, resume):
    """Each task in turn, in its own subfolder of `out`, with its own recipe; results.md and results.json
    after every task. Resumed, it skips finished tasks and continues the others; options given then apply
    to this invocation (suite.json keeps the ones the suite started with)."""
    suite_file = os.path.join(out, "suite.json")
    if resume:
        stored = read_suite(suite_file, out)
        if given.get("data", stored["data"]) != stored["data"]:
            raise UserError(f"--resume {out} is the suite --data {stored['data']}, not --data {given['data']}")
    tasks = suite_tasks(given.get("data") or stored["data"])
    folders = {task: os.path.join(out, os.path.basename(os.path.normpath(task))) for task in tasks}
    options = {"data_dir": os.path.abspath(DEFAULTS["data_dir"]), **(stored if resume else {}), **given}
    plan = {task: {"data_dir": options["data_dir"], **given} if os.path.exists(os.path.join(folder, "checkpoint.pth"))
            else options for task, folder in folders.items()}  # a started task keeps its own settings
    missing = {task: data.missing(task, options["data_dir"]) for task in tasks if not finished(folders[task])}
    if any(missing.values()):
        raise UserError(f"no data for {sum(map(bool, missing.values()))} of the {len(tasks)} tasks: " + ", ".join(
            f"{task} (looked in {where})" for task, where in missing.items() if where) + ". Put it there, or run the "
            f"others: --data {','.join(task for task in tasks if not missing.get(task))}")
    check_out(out, fresh=not resume)
    if ctx.control is not None:
        dist.barrier(group=ctx.control)  # every process has checked `out` before the first one writes to it
    if ctx.rank == 0 and not resume:
        os.makedirs(out, exist_ok=True)
        save_atomic(json.dumps(options, indent=1), suite_file)
    results = {}
    for task, folder in folders.items():
        resumable = os.path.exists(os.path.join(folder, "checkpoint.pth"))
        results[os.path.basename(folder)] = run_task({**plan[task], "data": task}, folder, ctx,
                                                     folder if resumable else None)
        if ctx.rank == 0:
            write_results(out, results, plan[task].get("model", DEFAULTS["model"]),
                          plan[task].get("method", DEFAULTS["method"]))


def read_suite(path, out):
    if not os.path.isfile(path):
        raise UserError(f"--resume {out}: no suite.json there, so it is not a suite's folder")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {out}: {path} is unreadable ({type(e).__name__}: {e}); a suite's folder holds the "
                        f"suite.json it wrote") from None


def write_results(out, results, model, method):
    """results.json and results.md: each task's final and best accuracy, the VTAB-1k group means, the mean of
    all tasks (of the task accuracies, as the paper's 73.4: not of the group means), and beside them the
    paper's ARC figures for the same tasks when the run is the paper's (vit_b16, arc)."""
    mean = lambda values: round(sum(values) / len(values), 2)
    groups = {g: [t for t in tasks if t in results] for g, tasks in data.VTAB_GROUPS.items() if set(tasks) & set(results)}
    summary = {"tasks": results, "groups": {g: mean([results[t]["final"] for t in ts]) for g, ts in groups.items()},
               "mean": mean([r["final"] for r in results.values()])}
    paper = (model, method) == ("vit_b16", "arc") and set(results) <= set(PAPER)
    if paper:
        summary["paper"] = {"tasks": {t: PAPER[t] for t in results}, "mean": mean([PAPER[t] for t in results]),
                            "groups": {g: mean([PAPER[t] for t in ts]) for g, ts in groups.items()}}
    save_atomic(json.dumps(summary, indent=1), os.path.join(out, "results.json"))

    def row(name, final, best=None, reference=0.0, trainable="", seconds=""):
        cells = [name, f"{final:.2f}", f"{best:.2f}" if best is not None else ""]
        cells += [f"{reference:.1f}", f"{final - reference:+.2f}"] * paper + [trainable, seconds]
        return "| " + " | ".join(cells) + " |"
    lines = [f"# ARC: {model}, {method}", "", "Top-1 test accuracy (%). **final**: after the last epoch, the honest "
             "figure. **best**: the best of the evaluated epochs, selected on the test set, as the official code reports "
             "(its protocol tests every epoch: `--eval-every 1`)." + " **paper**: the ARC paper's ViT-B/16 figures." * paper,
             "", "| task | final | best (test-selected) | " + "paper | final - paper | " * paper + "trainable | training + "
             "testing |", "|---" * (5 + 2 * paper) + "|"]
    ungrouped = [t for t in results if not any(t in ts for ts in groups.values())]
    for group, tasks in [*groups.items(), ("", ungrouped)]:
        for t in tasks:
            lines.append(row(t, results[t]["final"], results[t]["best"], PAPER.get(t, 0.0), f"{results[t]['trainable']:,}",
                             fmt_time(results[t]["seconds"]["training"] + results[t]["seconds"]["testing"])))
        if group:
            lines.append(row(f"**{group} mean** ({len(tasks)} tasks)", summary["groups"][group],
                             reference=paper and summary["paper"]["groups"][group]))
    lines.append(row(f"**mean of all {len(results)} tasks**", summary["mean"], reference=paper and summary["paper"]["mean"]))
    save_atomic("\n".join(lines) + "\n", os.path.join(out, "results.md"))


# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    args, given = parse_args(argv)
    ctx = setup_distributed(args.device, args.workers)
    resume = args.resume and os.path.abspath(args.resume)
    folder = resume and run_folder(resume)
    suite = bool(folder) and os.path.isfile(os.path.join(folder, "suite.json")) or suite_tasks(given.get("data", ""))
    name = "_".join([os.path.basename(os.path.normpath(given.get("data", DEFAULTS["data"]))).replace(",", "+"),
                     given.get("model", DEFAULTS["model"]), given.get("method", DEFAULTS["method"])])
    out = folder or args.out or os.path.join("runs", name)
    try:
        if args.eval_only:
            return eval_only(args, given, ctx)
        return run_suite(given, out, ctx, bool(resume)) if suite else run_task(given, out, ctx, resume)
    except (UserError, data.DataError) as e:
        message = str(e)
        if isinstance(e, data.DataError) and "Traceback" in message:  # raised in a DataLoader worker, wrapped
            message = message.strip().splitlines()[-1].split("DataError: ")[-1]
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        if ctx.rank == 0:
            print(f"\n{e}. {continue_with(e.epochs_done or suite, out, ctx)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C: checkpoints are written atomically
        print("\nstopped at once; checkpoint.pth, if there is one, holds the last completed epoch", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def continue_with(saved, out, ctx):
    """How to go on after a stop: --resume when something was saved, else the same command again."""
    argv = [a for i, a in enumerate(sys.argv) if not (a.startswith("--resume") or sys.argv[i - 1] == "--resume")]
    launcher = f"torchrun --nproc_per_node={ctx.world}" if ctx.world > 1 else "python"
    if not saved:
        return f"No epoch had finished, so nothing is saved. Start again with:\n  {launcher} {shlex.join(argv)}"
    return (f"What had finished is saved in {out} (an epoch in progress starts again). Continue with:\n  "
            f"{launcher} {shlex.join(argv + ['--resume', out])}")


if __name__ == "__main__":
    main()
