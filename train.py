"""Fine-tune a ViT or Swin with ARC: train, test, fold the adapters into the weights, save.

    python train.py --data dtd                   # DTD (VTAB-1k) on ViT-B/16, the authors' recipe
    python train.py --data cub                   # an FGVC set, with its own recipe
    python train.py --data vtab-1k               # the 19 VTAB-1k tasks, then the paper's table
    python train.py --data dtd --seeds 3         # seeds 42, 43, 44: the mean and its spread
    python train.py --data dtd --model vit_t16   # a laptop-sized run on real pretrained weights
    python train.py --resume runs/dtd_vit_b16_arc           # continue (with --epochs N: extend)
    python train.py --eval-only --checkpoint runs/dtd_vit_b16_arc/adapters.pth
    torchrun --nproc_per_node=4 train.py --data dtd         # several GPUs, the same global batch

A setting comes from the command line if given there; else, with --resume, from the run itself; else
from the authors' recipe for the task and model (paper.py); else from paper.DEFAULTS. A run's folder
gets metrics.jsonl (a line an epoch), checkpoint.pth (for --resume, after every epoch), adapters.pth
(the trained tensors) and folded.pth (the plain model, adapters folded in); a suite gets a folder
per task and results tables. Ctrl-C, SIGTERM or SIGHUP stop a run at once: the epoch in progress is
lost, and --resume continues from the last one saved.

The file reads as a run goes: the options; run_task, the checks before any work; train, which
decodes the data, builds the model and the optimizer, resumes, loops over epochs and steps, folds
and saves; then the helpers they call, and main.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import arc
import data
import paper
import runs
import swin
import vit
from runs import UserError, flag, fmt_time

MODELS = {name: getattr(module, name) for module in (vit, swin) for name in module.CONFIGS}
URLS = {**vit.URLS, **swin.URLS}  # the published checkpoint of each model: --weights auto
NAMED_WEIGHTS = ("auto", "augreg", "none")
# The numeric options: their ranges (beyond them a run would fail later, or mean nothing), of the
# type of their bounds, and their help
NUMBERS = {
    "rank": (1, 4096, "ARC bottleneck r"),
    "adapter_dropout": (0.0, 0.99, "dropout on the adapters' bottleneck"),
    "vit_dropout": (0.0, 0.99, "ViT dropout after the position embedding and in the MLP"),
    "drop_path": (0.0, 0.99, "Swin stochastic depth at the last block, from 0 at the first"),
    "lr": (0.0, 10.0, "AdamW peak learning rate: 0.01 on VTAB-1k with a ViT"),
    "weight_decay": (0.0, 10.0, "AdamW weight decay: 0 on VTAB-1k with a ViT"),
    "batch_size": (1, 65536, "global batch, over all processes"),
    "epochs": (1, 100_000, "training epochs"),
    "warmup_epochs": (0, 100_000, "linear warm-up, then cosine decay, per step: 10"),
    "img_size": (16, 4096, "input resolution"),
    "seed": (0, 2**31 - 1, "the same seed on the same CPU gives the same run"),
    "seeds": (1, 100, "run each task this many times, seeds --seed, --seed + 1, ..."),
    "eval_every": (1, 100_000, "test every N epochs, and after the last"),
    "workers": (0, 256, "image decoding threads"),
}
RECORDED = (*paper.DEFAULTS, "classes")  # the settings every file of a run records


class Stopped(Exception):
    """A stop asked for by a signal (its number): raised at once, wherever the run is."""


# --------------------------------------------------------------------------------------------------
# Options


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help gives each option's default, or says that the task's recipe sets it."""

    def _get_help_string(self, action):
        if action.dest in paper.RECIPE_KEYS:
            return f"{action.help} (default: the task's recipe)"
        default = paper.DEFAULTS.get(action.dest, action.default)
        if default in (None, False, argparse.SUPPRESS):
            return action.help
        return f"{action.help} (default: {default})"


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message} (python train.py --help lists the options)")


def parse_args(argv=None):
    """The options, and the settings among them that the command line gave (paths made absolute, so
    that a run resumed or tested from another folder finds what it used)."""
    parser = Parser(description=__doc__, formatter_class=HelpFormatter)
    option = parser.add_argument
    tasks = f"{' '.join(data.VTAB_TASKS)}; an FGVC set ({' '.join(data.FGVC_TASKS)})"
    option(
        "--data",
        type=data_option,
        help=f"a VTAB-1k task ({tasks}; a suite ({' '.join(data.SUITES)}) or a comma-separated "
        "list of tasks; a folder of train/ and test/ class folders; synthetic",
    )
    option(
        "--data-dir",
        type=path_option,
        help="where datasets are looked for (vtab-1k/<task>, fgvc/<set>, dtd/)",
    )
    option("--model", help="the backbone", choices=sorted(MODELS))
    option(
        "--weights",
        type=weights_option,
        help="auto (the checkpoint the official runs used, downloaded into torch hub's cache), "
        "augreg (vit_b16: Google's AugReg ImageNet-21k, the paper's ARC*), a path, or none",
    )
    option("--method", help="what trains", choices=["arc", "arc_att", "linear", "full"])
    option(
        "--swin-ffn-adapter",
        help="norm2 (foldable), or residual: on the residual stream, as the official ARC Swin",
        choices=["norm2", "residual"],
    )
    option(
        "--precision",
        help="bf16 autocast, or fp32; auto: bf16 on a CUDA GPU or a CPU with native bf16",
        choices=["auto", "bf16", "fp32"],
    )
    for key, (_, high, text) in NUMBERS.items():
        option(flag(key), help=text, type=type(high))
    option("--out", type=path_option, help="output folder (default: runs/<data>_<model>_<method>)")
    option(
        "--device",
        help="cpu, cuda or cuda:N",
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    option("--resume", type=path_option, help="the folder of a run or suite to continue")
    option(
        "--eval-only", help="test --checkpoint (an adapters.pth or folded.pth)", action="store_true"
    )
    option("--checkpoint", type=path_option, help="for --eval-only")
    parser.set_defaults(workers=min(8, data.CORES))
    args = parser.parse_args(argv)
    check_options(args, parser.error)
    given = {key: getattr(args, key) for key in paper.DEFAULTS if getattr(args, key) is not None}
    return args, given


def not_empty(text):
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a value, or leave the option out")
    return text


def path_option(text):
    """A path, made absolute: a run resumed or tested from another folder finds what it used."""
    return os.path.abspath(not_empty(text))


def weights_option(text):
    return text if text in NAMED_WEIGHTS else path_option(text)


def data_option(text):
    """The folders of a task list made absolute one by one; names (dtd, vtab-1k) stay names."""
    names = [name.strip() for name in not_empty(text).split(",")]
    return ",".join(path_option(name) if data.is_path(name) else name for name in names)


def check_options(args, error):
    """Numbers in their ranges, a device this machine has, and options that go together; else
    error(message)."""
    for key, (low, high, _) in NUMBERS.items():
        value = getattr(args, key)
        if value is not None and not low <= value <= high:  # `not`: nan fails every comparison
            error(f"{flag(key)} {value} must be from {low} to {high}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        error(f"--device {args.device} is not a device this script runs on: cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.eval_only != bool(args.checkpoint):
        error(
            "--eval-only and --checkpoint go together: "
            "--eval-only --checkpoint runs/<run>/adapters.pth"
        )
    if args.resume and args.out and args.out not in (args.resume, os.path.dirname(args.resume)):
        error(f"--resume {args.resume} and --out {args.out} name different runs: give one of them")


# --------------------------------------------------------------------------------------------------
# A run: the checks before any work, then the work


def run_task(given, out, ctx, resume=None):
    """One run into the folder `out`, fresh, or continued from `resume` (its folder or its
    checkpoint.pth); returns its result. The cheap checks come first (the settings, the data's
    presence, the folder), then the weights (perhaps a download), then the data's decoding."""
    on_stop_signals(stop)  # again: the suite's previous run ignores them once it has finished
    checkpoint = read_checkpoint(resume, ctx.world) if resume else None
    saved = checkpoint and checkpoint["config"]
    cfg, sources, recipe_name = paper.settings(given, saved, auto_precision(ctx.device))
    # every setting and where it came from (a setting of the other family is left out)
    ctx.log(
        f"{recipe_name} recipe; "
        + ", ".join(
            f"{key} {getattr(cfg, key)} ({source})"
            for key, source in sources.items()
            if source != "n/a"
        )
    )
    done = saved and runs.finished(out, cfg.epochs)
    if saved:
        check_same_run(given, saved, RESUME_MAY_CHANGE, f"--resume {out}")
        if cfg.epochs < saved["epochs"]:
            raise UserError(
                f"--resume {out} is a run of {saved['epochs']} epochs: --epochs {cfg.epochs} "
                f"would shorten it; a run can only be extended"
            )
    with torch.device("meta"):  # the options against the model, before any data is decoded
        build_model(cfg, num_classes=1)
    if done:
        ctx.log(
            f"{out} has finished its {cfg.epochs} epochs (--resume with more --epochs trains it "
            f"for longer)"
        )
        return done["result"]
    if cfg.weights == "augreg" and cfg.model not in vit.AUGREG_URLS:
        raise UserError(f"--weights augreg is for {', '.join(vit.AUGREG_URLS)}, not {cfg.model}")
    data.check(cfg.data, cfg.data_dir)  # cheap: before anything is downloaded or decoded
    with runs.owned(out, fresh=not checkpoint) if ctx.rank == 0 else contextlib.nullcontext():
        return train(cfg, out, ctx, checkpoint)


def train(cfg, out, ctx, checkpoint):
    """Data, model, optimizer and resume, the loop over epochs and steps, the fold, the files."""
    # Data: decoded once into memory, by every process for itself
    weights_path = weights_file(cfg, ctx)
    task = data.build(cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    if checkpoint:
        check_classes(checkpoint["config"]["classes"], task, f"--resume {out}: the run")
    train_data, test_data = data.Loader(task.train, ctx.device), data.Loader(task.test, ctx.device)
    # every file's settings; all adapters fold into the weights but the official Swin's FFN ones
    folds = not (cfg.method == "arc" and cfg.swin_ffn_adapter == "residual")
    record = {**vars(cfg), "classes": task.classes, "folds": folds}

    # Model: the pretrained backbone, frozen but for what the method trains
    model = prepare_model(cfg, task.num_classes, weights_path, ctx.log).to(ctx.device)
    # dropout, drop-path: each process draws its own masks, the first the one-process ones, from
    # seeds apart from those of the data's order
    if ctx.rank:
        torch.manual_seed(cfg.seed * 1_000_003 + 7_919 * ctx.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    if ctx.world > 1:  # buffers (Swin's masks) are built alike by every process: no sync needed
        net = DistributedDataParallel(model, broadcast_buffers=False)
    ctx.log(
        f"{task.description}\n{cfg.model} {cfg.method}: {sum(p.numel() for p in params):,} "
        f"trainable parameters; {ctx.world} process(es) on {ctx.device} in {cfg.precision}; "
        f"output in {out}"
    )

    # Optimizer, and resume: the trained tensors, AdamW's moments, the random states, the history
    cuda = ctx.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    history = restore(checkpoint, cfg, model, optimizer, ctx, out) if checkpoint else []

    steps = math.ceil(len(train_data) / cfg.batch_size)
    progress = ctx.rank == 0 and sys.stdout.isatty()  # a live line on a terminal, not in a log
    with frozen_in_bf16(model, cuda and cfg.precision == "bf16"):
        for epoch in range(len(history), cfg.epochs):
            epoch_started = time.time()
            losses = torch.zeros(steps, device=ctx.device)  # read once, after the epoch
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(len(train_data), generator=generator)
            indices, loss_weights = shares(order, cfg.batch_size, ctx)
            batches = train_data(indices, seed=cfg.seed * 1000 + epoch)
            for step, (images, labels) in enumerate(batches):
                # learning rate: linear warm-up, then cosine decay, set at every step
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps + step, cfg, steps)
                with autocast(ctx.device, cfg.precision):
                    # forward: uint8 images (B, 3, H, W), normalised, to logits (B, classes)
                    logits = net(data.normalize(images))
                    # loss: this process's sum, weighted so that DDP's mean is the batch mean
                    loss = F.cross_entropy(logits, labels, reduction="sum") * loss_weights[step]
                # backward, and the gradient's norm clipped to 1, as the official code
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                # step: AdamW on the trainable tensors
                optimizer.step()
                losses[step] = loss.detach()  # no host sync here
                if progress:
                    show_progress(step + 1, steps, len(order), epoch_started)
            if progress:
                print("\r\033[K", end="")  # the progress line gives way to the epoch's line

            # loss: the epoch's one host sync (the GPU's work is then done, and timed)
            if ctx.world > 1:
                dist.all_reduce(losses)  # world times the batch means: see shares
            step_losses = (losses / ctx.world).tolist()
            check_finite(step_losses, epoch, out, history)
            seconds = time.time() - epoch_started
            metrics = {
                "epoch": epoch + 1,
                "loss": round(sum(step_losses) / steps, 5),
                "lr": optimizer.param_groups[0]["lr"],
                "train_s": round(seconds, 2),
                "images_per_s": round(len(train_data) / seconds, 1),
            }
            # test: every --eval-every epochs, and after the last
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics["test_acc"] = evaluate(
                    model, test_data, 4 * cfg.batch_size, ctx, cfg.precision
                )
                metrics["test_s"] = round(time.time() - epoch_started - seconds, 2)
            earlier = history[-1]["elapsed_s"] if history else 0
            metrics["elapsed_s"] = round(time.time() - epoch_started + earlier, 1)
            history.append(metrics)
            # save: checkpoint.pth, the whole state of the run, then metrics.jsonl from the history
            save_checkpoint(out, record, model, optimizer, history, ctx)
            # log: a line an epoch
            log_epoch(ctx, metrics, cfg.epochs)

    # Fold: the adapters into the frozen weights, checked on float32 logits of test images
    tested = [m["test_acc"] for m in history if "test_acc" in m]
    trained = trained_tensors(model)
    result = {
        "final": tested[-1],
        "best": max(tested),
        "trainable": sum(v.numel() for v in trained.values()),
    }
    if not record["folds"]:
        ctx.log(
            "adapters not folded: with --swin-ffn-adapter residual (the official ARC Swin's "
            "placement) the FFN adapter transforms the residual stream, which no weight can "
            "absorb; adapters.pth is the run"
        )
    elif cfg.method in ("arc", "arc_att"):
        ctx.log(fold_and_compare(model, task.test, ctx.device))

    # Save: folded.pth, the plain architecture whatever the method; then adapters.pth, last, with
    # the stop signals ignored: once it is written the run has finished, and a stop changes nothing
    adapters, folded = os.path.join(out, "adapters.pth"), os.path.join(out, "folded.pth")
    if ctx.rank == 0 and record["folds"]:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        folded_record = {**record, "method": "folded", "trained_with": cfg.method}
        runs.save_atomic({"config": folded_record, "state_dict": state}, folded)
    on_stop_signals(signal.SIG_IGN)
    if ctx.rank == 0:
        runs.save_atomic({"config": record, "result": result, "state_dict": trained}, adapters)
        also = f" and {folded}" if record["folds"] else ""
        ctx.log(
            f"summary: {cfg.model} {cfg.method} on {cfg.data}: {result['trainable']:,} trainable "
            f"parameters, final test accuracy {result['final']:.2f}%, best over evaluated epochs "
            f"{result['best']:.2f}% (selected on the test set, as the official code reports), "
            f"{fmt_time(history[-1]['elapsed_s'])} training and testing\nsaved {adapters} "
            f"({os.path.getsize(adapters) / 1e6:.2f} MB){also}"
        )
    return result


# --------------------------------------------------------------------------------------------------
# The model: built, loaded, frozen but for what the method trains


def build_model(cfg, num_classes):
    adapters = cfg.method if cfg.method in ("arc", "arc_att") else None
    if cfg.model.startswith("vit"):
        family = {"dropout": cfg.vit_dropout}
    else:
        ffn_adapter = cfg.swin_ffn_adapter if adapters else "norm2"
        family = {"drop_path": cfg.drop_path, "ffn_adapter": ffn_adapter}
    try:
        return MODELS[cfg.model](
            num_classes=num_classes,
            img_size=cfg.img_size,
            rank=cfg.rank,
            arc=adapters,
            adapter_dropout=cfg.adapter_dropout,
            **family,
        )
    except ValueError as e:
        raise UserError(
            f"--img-size {cfg.img_size} does not suit --model {cfg.model}: {e}"
        ) from None


def prepare_model(cfg, num_classes, weights_path, log):
    """The model of `cfg` with its pretrained weights, and only what its method trains trainable."""
    torch.manual_seed(cfg.seed)  # with --weights none the frozen backbone is the seed's random init
    model = build_model(cfg, num_classes)
    with warnings.catch_warnings(record=True) as notes:  # the loaders' notes: a head left out
        warnings.simplefilter("always")
        try:
            if weights_path:
                (vit if cfg.model.startswith("vit") else swin).load_pretrained(model, weights_path)
        except vit.CheckpointError as e:
            named = cfg.weights in ("auto", "augreg")
            advice = f"; --weights {cfg.weights} downloaded it: delete it to download it again"
            raise UserError(f"--weights {e}{advice if named else ''}") from None
    for note in notes:
        log(f"note: {note.message}")
    if cfg.method in ("arc", "arc_att"):
        arc.mark_trainable(model)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(cfg.method == "full" or name.startswith("head."))
    return model


def weights_file(cfg, ctx):
    """The file --weights names (None for 'none'); 'auto' and 'augreg': a published checkpoint,
    downloaded once into torch hub's cache (vit.download) by the first process of each machine,
    while the others wait, then find it there."""
    if cfg.weights == "none":
        return None
    if cfg.weights not in NAMED_WEIGHTS:
        if not os.path.isfile(cfg.weights):
            raise UserError(
                f"--weights {cfg.weights} is not a file, or not there now: pass --weights with "
                f"where the file is"
            )
        return cfg.weights
    url = (vit.AUGREG_URLS if cfg.weights == "augreg" else URLS)[cfg.model]
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    if ctx.world > 1 and not first:
        dist.barrier()
    if not os.path.exists(vit.cached_file(url)):
        ctx.log(f"downloading {url}\n         to {vit.cached_file(url)}")
    try:
        path = vit.download(url, progress=True)
    except vit.CheckpointError as e:
        raise UserError(f"--weights {cfg.weights}: {e}, or pass --weights PATH") from None
    if ctx.world > 1 and first:
        dist.barrier()
    return path


def trained_tensors(model):
    """What the method trains (for ARC: arc.arc_state_dict); linear and full train other tensors."""
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trained_tensors(model, state_dict, source):
    """The tensors a run trained (trained_tensors) into a model built as the run's."""
    try:  # shapes are checked here, names below
        unexpected = model.load_state_dict(state_dict, strict=False).unexpected_keys
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(
            f"{source} does not fit this model: {' '.join(str(e).split())[:300]}"
        ) from None
    missing = {name for name, p in model.named_parameters() if p.requires_grad} - state_dict.keys()
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit this model: missing {sorted(missing)[:4]}, unexpected "
            f"{unexpected[:4]}"
        )


# --------------------------------------------------------------------------------------------------
# The step's parts: its share of the batch, its precision, its learning rate; testing


def auto_precision(device):
    """(precision, why) for --precision auto: bf16 autocast where the hardware computes bf16
    natively (a CUDA GPU; a CPU with AVX512-BF16 or AMX, as oneDNN reports it), else float32."""
    if device.type == "cuda":
        return "bf16", "auto: a CUDA GPU"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16", "auto: this CPU computes bf16 natively"
    return "fp32", "auto: this CPU has no native bf16"


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def lr_at(step, cfg, steps_per_epoch):
    """The official schedule: linear warm-up, then cosine decay to 0 at the last step."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def shares(order, batch_size, ctx):
    """This process's share of each global batch of `order` (the same order on every process), and
    the weight that makes its summed loss `world` times its part of the batch mean: DDP's average of
    the gradients is then exactly the one-process gradient. A share that would be empty (a short
    last batch) is one image at weight 0: the process still takes part in DDP's step, and no kernel
    is given an empty batch."""
    indices, weights = [], []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        share = batch[ctx.rank :: ctx.world]
        indices.append(share if len(share) else batch[:1])
        weights.append(ctx.world / len(batch) if len(share) else 0.0)
    return indices, weights


@contextlib.contextmanager
def frozen_in_bf16(model, enabled):
    """Keep the frozen weights of linear and conv layers in bf16 while training on CUDA: autocast
    caches its casts only of tensors that require grad, and would cast these ~86M values again at
    every forward. The result is the same (autocast runs those layers in bf16 anyway). The float32
    originals wait in host memory, not on the GPU, and come back on exit, for folding. On a CPU this
    was slower (ViT-B/16, batch 8: 2.17 s a step against 1.99 s), so they stay float32 there."""
    layers = [m for m in model.modules() if enabled and isinstance(m, (nn.Linear, nn.Conv2d))]
    frozen = [p for m in layers for p in m.parameters(recurse=False) if not p.requires_grad]
    originals = [p.data.to("cpu") for p in frozen]
    for p in frozen:
        p.data = p.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for p, original in zip(frozen, originals, strict=True):
            p.data = original.to(p.device)


@torch.no_grad()
def evaluate(model, loader, batch_size, ctx, precision):
    """Test accuracy in %, counted on the device and summed over processes; `batch_size` images a
    process at a time."""
    model.eval()
    mine = torch.arange(ctx.rank, len(loader), ctx.world)  # every process a share of the images
    counts = torch.zeros(2, device=ctx.device)  # correct, total: one host sync at the end
    for images, labels in loader(list(mine.split(batch_size))):
        with autocast(ctx.device, precision):
            counts[0] += (model(data.normalize(images)).argmax(-1) == labels).sum()
        counts[1] += len(labels)
    if ctx.world > 1:
        dist.all_reduce(counts)
    model.train()
    return round(100 * (counts[0] / counts[1]).item(), 2)


@torch.no_grad()
def fold_and_compare(model, test_split, device, n=64):
    """Fold the adapters into the weights, comparing float32 logits of the first n test images
    before and after: cheaper than testing twice, and no bf16 near-tie can hide or fake a
    difference."""
    model.eval()
    images = data.normalize(test_split.images[:n].to(device))
    before = model(images)
    arc.reparameterize(model)
    gap, scale = torch.stack([(model(images) - before).abs().max(), before.abs().max()]).tolist()
    if not gap <= 1e-3 * scale + 1e-5:  # `not`: a nan fails it too
        raise UserError(
            f"folding changed float32 logits by {gap:.1e} (largest {scale:.2f}): the adapters "
            f"hold nan or infinite values, or this is a bug to report; adapters.pth is not written"
        )
    return (
        f"adapters folded into the weights: float32 logits of {len(images)} test images within "
        f"{gap:.1e} of the unfolded model's (largest {scale:.2f}) (they agree)"
    )


# --------------------------------------------------------------------------------------------------
# Around the loop: progress, the NaN check, checkpoints, resuming


def show_progress(step, steps, images, started):
    """The epoch's live line: step out of total, images/s, time to go; rewritten in place."""
    seconds = time.time() - started
    rate = step / steps * images / max(seconds, 1e-9)
    to_go = seconds / step * (steps - step)
    print(f"\r  step {step}/{steps}  {rate:.1f} img/s  {fmt_time(to_go)} to go", end="", flush=True)


def check_finite(step_losses, epoch, out, history):
    diverged = [step for step, loss in enumerate(step_losses) if not math.isfinite(loss)]
    if diverged:
        kept = "no epoch was saved"
        if history:
            kept = f"{out}/checkpoint.pth holds epoch {len(history)}"
        raise UserError(
            f"the loss became nan or infinite at epoch {epoch + 1}, step {diverged[0] + 1}; "
            f"{kept}. Try a lower --lr"
        )


def log_epoch(ctx, metrics, epochs):
    eta = metrics["elapsed_s"] / metrics["epoch"] * (epochs - metrics["epoch"])
    tested = f"  test {metrics['test_acc']:.2f}%" if "test_acc" in metrics else ""
    ctx.log(
        f"epoch {metrics['epoch']:3d}/{epochs}  loss {metrics['loss']:.4f}  "
        f"lr {metrics['lr']:.2e}  "
        f"{metrics['images_per_s']:7.1f} img/s  elapsed {fmt_time(metrics['elapsed_s'])}  "
        f"eta {fmt_time(eta)}{tested}"
    )


def save_checkpoint(out, record, model, optimizer, history, ctx):
    """checkpoint.pth: everything a resumed run needs to end as an uninterrupted one (every
    process's random state included); then metrics.jsonl, a line an epoch, from the history."""
    cuda_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
    rng = [torch.get_rng_state(), cuda_rng]
    states = [rng]
    if ctx.world > 1:  # every process's random state (its dropout), gathered: a collective
        states = [None] * ctx.world
        dist.all_gather_object(states, rng)
    if ctx.rank == 0:
        checkpoint = {
            "config": record,
            "trained": trained_tensors(model),
            "rng": states,
            "optimizer": optimizer.state_dict(),
            "history": history,
        }
        runs.save_atomic(checkpoint, os.path.join(out, "checkpoint.pth"))
        lines = "".join(json.dumps(m) + "\n" for m in history)
        runs.save_atomic(lines, os.path.join(out, "metrics.jsonl"))


def read_checkpoint(path, world):
    """The checkpoint.pth of the run folder --resume names (or that file itself)."""
    folder = run_folder(path)
    if not os.path.exists(folder):
        raise UserError(f"--resume {folder}: no such folder")
    if folder == path:
        path = os.path.join(folder, "checkpoint.pth")
        if not os.path.exists(path):
            raise UserError(
                f"--resume {folder}: no checkpoint.pth there, so no finished epoch to continue; "
                f"start the run again without --resume"
            )
    keys = ("config", "trained", "optimizer", "rng", "history")
    what = "a checkpoint.pth (adapters.pth and folded.pth hold results, not a run to continue)"
    checkpoint = runs.read_saved(path, "--resume", keys, what, RECORDED)
    if len(checkpoint["rng"]) != world:
        raise UserError(
            f"--resume: {path} was written by {len(checkpoint['rng'])} process(es); resume it with "
            f"as many (torchrun --nproc_per_node={len(checkpoint['rng'])} for several)"
        )
    return checkpoint


def restore(checkpoint, cfg, model, optimizer, ctx, out):
    """The state checkpoint.pth saved, into the model, the optimizer and the random generators;
    returns the history."""
    source = os.path.join(out, "checkpoint.pth")
    load_trained_tensors(model, checkpoint["trained"], source)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        cpu_rng, cuda_rng = checkpoint["rng"][ctx.rank]
        torch.set_rng_state(cpu_rng)
        if ctx.device.type == "cuda" and cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, ctx.device)
        history = list(checkpoint["history"])
        ctx.log(f"resuming {out} after epoch {history[-1]['epoch']}")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(f"--resume {source} does not fit this run ({type(e).__name__})") from None
    if checkpoint["config"]["epochs"] != cfg.epochs:
        history[-1]["schedule"] = (
            f"then extended from {checkpoint['config']['epochs']} to {cfg.epochs} epochs"
        )
        ctx.log(f"extending the run: the cosine schedule is recomputed for {cfg.epochs} epochs")
    return history


def run_folder(path):
    """The folder --resume names: itself, or a file's (a mistyped folder stays itself, to be
    reported)."""
    return os.path.dirname(path) if os.path.isfile(path) or path.endswith(".pth") else path


# What a resumed run may change: where its files are now, how often to test, and --epochs, which
# may grow. A test of a saved model may change its data, its batch and its precision.
RESUME_MAY_CHANGE = ("data_dir", "eval_every", "epochs")
EVAL_MAY_CHANGE = ("data", "data_dir", "batch_size", "precision")


def check_same_run(given, saved, may_change, what):
    """A run continues, or is tested, with its own settings: the command line may change only those
    of `may_change`, name another folder for a task that was a folder, and say where the run's
    weights file has moved (a path for one that is not there now), not name other weights."""
    changed = [
        key
        for key in given
        if key not in may_change
        and given[key] != saved[key]
        and not (
            key in ("data", "weights")
            and data.is_path(given[key])
            and data.is_path(saved[key])
            and (key == "data" or not os.path.exists(saved[key]))
        )
    ]
    if changed:
        differences = ", ".join(
            f"{flag(key)} {saved[key]} there, {given[key]} here" for key in changed
        )
        raise UserError(
            f"{what} belongs to another run: {differences}; give the run's own weights and "
            f"settings, or start a new run with another --out"
        )


def check_classes(classes, task, source):
    if classes != task.classes:
        raise UserError(
            f"{source} was trained on {len(classes)} classes {classes[:5]}, the data has "
            f"{task.num_classes} {task.classes[:5]}"
        )


# --------------------------------------------------------------------------------------------------
# Testing a saved model, and the command line


def eval_only(args, given, ctx):
    """Test the model a checkpoint records, with its own settings; the command line may say where
    its data and weights are now, the test's batch and its precision."""
    source = f"--checkpoint {args.checkpoint}"
    saved = runs.read_saved(
        args.checkpoint,
        "--checkpoint",
        ["config", "state_dict"],
        "an adapters.pth or folded.pth",
        RECORDED,
    )
    check_same_run(given, saved["config"], EVAL_MAY_CHANGE, source)
    cfg = paper.settings(given, saved["config"], auto_precision(ctx.device))[0]
    classes = saved["config"]["classes"]
    data.check(cfg.data, cfg.data_dir)
    if cfg.method == "folded":  # the plain architecture: every tensor comes from the file
        model = build_model(cfg, len(classes))
    else:
        model = prepare_model(cfg, len(classes), weights_file(cfg, ctx), ctx.log)
    load_trained_tensors(model, saved["state_dict"], source)
    task = data.build(cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    check_classes(classes, task, source)
    loader = data.Loader(task.test, ctx.device)
    accuracy = evaluate(model.to(ctx.device), loader, 4 * cfg.batch_size, ctx, cfg.precision)
    ctx.log(
        f"{args.checkpoint}: {cfg.model} {cfg.method} on {cfg.data}, batch {4 * cfg.batch_size}, "
        f"{cfg.precision}: test accuracy {accuracy:.2f}%"
    )
    return accuracy


def default_out(given):
    """runs/<data>_<model>_<method>; a task list's entries joined by '+', a folder by its name."""
    setting = {**paper.DEFAULTS, **given}
    tasks = "+".join(
        os.path.basename(os.path.normpath(task)) for task in setting["data"].split(",")
    )
    return os.path.join("runs", f"{tasks}_{setting['model']}_{setting['method']}")


def log(*lines):
    """print, flushed; when the reader has gone (`| head`), the run goes on unseen."""
    try:
        print(*lines, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def silent(*lines):
    """The log of the processes after the first: only the first prints."""


def setup_distributed(device_name, workers):
    """Where this process runs: alone, or as one of torchrun's (RANK, WORLD_SIZE, LOCAL_RANK)."""
    ctx = SimpleNamespace(
        device=torch.device(device_name), workers=workers, rank=0, world=1, log=log
    )
    if "RANK" in os.environ:
        cuda = ctx.device.type == "cuda"
        # an hour: the first process of a machine may download the weights while the others wait
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
        if cuda:
            ctx.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(ctx.device)
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        if ctx.rank:
            ctx.log = silent
    return ctx


def continue_with(out):
    """How to go on after a stop: --resume when an epoch was saved, else the same command again."""
    if any(os.path.exists(os.path.join(out, name)) for name in ("checkpoint.pth", "suite.json")):
        return f"What was saved is in {out}: continue with --resume {out}"
    return "No epoch had finished, so nothing is saved: give the same command again"


def stop(signum, frame):
    raise Stopped(signum)


def on_stop_signals(action):
    """Handle SIGINT, SIGTERM and SIGHUP with `action` from now on; returns the handlers before."""
    return {
        signum: signal.signal(signum, action)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # a non-ASCII path on an ASCII terminal: escaped
        stream.reconfigure(errors="backslashreplace")
    previous = on_stop_signals(stop)
    args, given = parse_args(argv)
    ctx = setup_distributed(args.device, args.workers)
    resume = args.resume and run_folder(args.resume)
    out = resume or args.out or os.path.abspath(default_out(given))
    in_suite = bool(resume) and os.path.isfile(os.path.join(resume, "suite.json"))
    try:
        if args.eval_only:
            return eval_only(args, given, ctx)
        if in_suite or paper.suite_tasks(given.get("data", "")) or (args.seeds or 1) > 1:
            return paper.run_suite(given, args.seeds, out, ctx, bool(resume), run_task)
        return run_task(given, out, ctx, args.resume)
    except (UserError, data.DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:
        if ctx.rank == 0:  # the epoch in progress is lost: it starts again on --resume
            name = signal.Signals(e.args[0]).name
            print(f"\nstopped by {name}. {continue_with(out)}", file=sys.stderr)
        sys.exit(128 + e.args[0])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Until main runs, and once it has returned, a stop signal is ignored: a run that has finished
    # stays finished (exit 0), whenever the signal comes.
    on_stop_signals(signal.SIG_IGN)
    main()
