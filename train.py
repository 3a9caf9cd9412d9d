"""Fine-tune a ViT or Swin with ARC: train, test, fold the adapters into the weights, save.

    python train.py --data dtd                      # VTAB-1k DTD on ViT-B/16 (ImageNet-21k), the authors' recipe
    python train.py --data cub                      # an FGVC set, with its own lr, weight decay and dropouts
    python train.py --data vtab-1k                  # the 19 VTAB-1k tasks in turn, then results.md: the paper's table
    python train.py --data dtd --model vit_t16      # a laptop-sized run on real pretrained weights
    python train.py --resume runs/dtd_vit_b16_arc   # continue an interrupted run (with --epochs N: extend it)
    python train.py --eval-only --checkpoint runs/dtd_vit_b16_arc/adapters.pth
    torchrun --nproc_per_node=4 train.py --data dtd # several GPUs; --batch-size stays the global batch

A setting comes from the command line if given there; else, with --resume, from the run itself; else
from the authors' recipe for the task and model (paper.py); else from paper.DEFAULTS. A run's folder gets
metrics.jsonl (a line an epoch), checkpoint.pth (for --resume), adapters.pth (the trained tensors) and
folded.pth (the plain model, adapters folded in); a suite gets a folder per task and results tables.
Around the loop, runs.py keeps the run's files, stop requests and processes; data.py the data.
"""

import argparse
import contextlib
import math
import os
import signal
import sys
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import arc
import data
import paper
import runs
import swin
import vit
from runs import UserError

MODELS = {name: getattr(module, name) for module in (vit, swin) for name in module.CONFIGS}
# ---------------------------------------------------------------------------------------------------
# Options


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help gives each option's default, or says that the task's recipe sets it."""

    def _get_help_string(self, action):
        if action.dest in paper.RECIPE_KEYS:
            return f"{action.help} (default: the task's recipe)"
        default = paper.DEFAULTS.get(action.dest, action.default)
        return (
            action.help
            if default in (None, False, argparse.SUPPRESS)
            else f"{action.help} (default: {default})"
        )


def parse_args(argv=None):
    """The options, and the settings among them that the command line gave (paths made absolute, so that a
    run resumed or tested from another folder finds what it used)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.error = lambda message: sys.exit(
        f"error: {message} (python train.py --help lists the options)"
    )
    add = lambda name, help, **kw: p.add_argument(name, help=help, **kw)
    add(
        "--data",
        f"a VTAB-1k task ({' '.join(data.VTAB_TASKS)}); an FGVC set ({' '.join(data.FGVC_TASKS)}); a suite "
        f"({' '.join(data.SUITES)}) or a comma-separated list of tasks; a folder of train/ and test/ class folders; "
        f"synthetic",
    )
    add(
        "--data-dir",
        "where datasets are looked for (vtab-1k/<task>, fgvc/<set>, dtd/) and downloaded",
    )
    add("--model", "the backbone", choices=sorted(MODELS))
    add(
        "--weights",
        "auto (the checkpoint the official runs used, downloaded into torch hub's cache), a path, or none",
    )
    add("--method", "what trains", choices=["arc", "arc_att", "linear", "full"])
    add("--rank", "ARC bottleneck r", type=int)
    add(
        "--adapter-dropout",
        "dropout on the adapters' bottleneck: 0.1 on ViTs, 0.5 on Swin",
        type=float,
    )
    add(
        "--vit-dropout",
        "ViT dropout after the position embedding and in the MLP: 0 on VTAB-1k",
        type=float,
    )
    add(
        "--drop-path",
        "Swin stochastic depth at the last block, rising from 0 at the first: 0.1",
        type=float,
    )
    add(
        "--swin-ffn-adapter",
        "norm2 (foldable), or residual: on the residual stream, as the official ARC Swin",
        choices=["norm2", "residual"],
    )
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
    add("--workers", "image decoding processes", type=int, default=min(8, data.CORES))
    add("--resume", "the folder of a run or suite to continue")
    add("--eval-only", "test --checkpoint (an adapters.pth or folded.pth)", action="store_true")
    add("--checkpoint", "for --eval-only")
    args = p.parse_args(argv)
    check_options(args, p.error)
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    if args.weights not in (None, "auto", "none"):
        args.weights = os.path.abspath(args.weights)
    if args.data:  # the folders of a task list too, one by one; names (dtd, vtab-1k) stay names
        names = [name.strip() for name in args.data.split(",")]
        args.data = ",".join(
            os.path.abspath(name) if data.is_path(name) else name for name in names
        )
    return args, {
        key: getattr(args, key) for key in paper.DEFAULTS if getattr(args, key) is not None
    }


def check_options(args, error):
    """Numbers in their ranges, a device this machine has, and options that go together; else error(message)."""
    for keys, ok, rule in (
        (
            ("rank", "batch_size", "epochs", "img_size", "eval_every"),
            lambda v: v >= 1,
            "at least 1",
        ),
        (("warmup_epochs", "workers"), lambda v: v >= 0, "at least 0"),
        (
            ("lr", "weight_decay"),
            lambda v: 0 <= v <= 10,
            "a number from 0 to 10 (recipes: 0 to 0.05)",
        ),
        (("adapter_dropout", "vit_dropout", "drop_path"), lambda v: 0 <= v < 1, "a rate in [0, 1)"),
    ):
        for key in keys:
            if getattr(args, key) is not None and not ok(
                getattr(args, key)
            ):  # `not ok`: nan fails every test
                error(f"{runs.flag(key)} {getattr(args, key)} must be {rule}")
    try:
        device_type = torch.device(args.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        error(f"--device {args.device} is not a device this script runs on: cpu, cuda or cuda:N")
    if device_type == "cuda" and not torch.cuda.is_available():
        error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.eval_only != bool(args.checkpoint):
        error(
            "--eval-only and --checkpoint go together: --eval-only --checkpoint runs/<run>/adapters.pth"
        )
    if (
        args.resume
        and args.out
        and os.path.abspath(args.out)
        not in (os.path.abspath(args.resume), os.path.dirname(os.path.abspath(args.resume)))
    ):
        error(f"--resume {args.resume} and --out {args.out} name different runs: give one of them")


# ---------------------------------------------------------------------------------------------------
# The model: built, loaded, frozen but for what the method trains


def build_model(cfg, num_classes):
    adapters = cfg.method if cfg.method in ("arc", "arc_att") else None
    family = (
        dict(dropout=cfg.vit_dropout)
        if cfg.model.startswith("vit")
        else dict(
            drop_path=cfg.drop_path, ffn_adapter=cfg.swin_ffn_adapter if adapters else "norm2"
        )
    )
    try:
        return MODELS[cfg.model](
            num_classes=num_classes,
            img_size=cfg.img_size,
            rank=cfg.rank,
            **family,
            arc=adapters,
            adapter_dropout=cfg.adapter_dropout,
        )
    except ValueError as e:
        raise UserError(
            f"--img-size {cfg.img_size} does not suit --model {cfg.model}: {e}"
        ) from None


def prepare_model(cfg, num_classes, weights_path, log):
    """The model of `cfg` with its pretrained weights, and only what its method trains trainable."""
    torch.manual_seed(cfg.seed)  # with --weights none the frozen backbone is the seed's random init
    model = build_model(cfg, num_classes)
    with warnings.catch_warnings(
        record=True
    ) as notes:  # the loaders' notes: a head left out, a resize
        warnings.simplefilter("always")
        runs.load_weights(model, cfg.model, cfg.weights, weights_path)
    for note in notes:
        log(f"note: {note.message}")
    if cfg.method in ("arc", "arc_att"):
        arc.mark_trainable(model)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(cfg.method == "full" or name.startswith("head."))
    return model


def folds(cfg):
    """Whether the run's adapters fold into its weights: all do but the official Swin's FFN-side placement."""
    return not (
        cfg.method == "arc" and cfg.model.startswith("swin") and cfg.swin_ffn_adapter == "residual"
    )


# ---------------------------------------------------------------------------------------------------
# The step, and what it means: its share of the batch, its loss weight, its precision


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(step, cfg, steps_per_epoch):
    """The official schedule: linear warm-up, then cosine decay to 0 at the last step."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def shares(order, batch_size, ctx):
    """This process's share of each global batch of `order` (the same order on every process), and the weight
    that makes its summed loss `world` times its part of the batch mean: DDP's average of the gradients is then
    exactly the one-process gradient. A share that would be empty (a short last batch) is one image at weight 0:
    the process still takes part in DDP's step, and no kernel is given an empty batch."""
    indices, weights = [], []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        share = batch[ctx.rank :: ctx.world]
        indices.append(share if len(share) else batch[:1])
        weights.append(ctx.world / len(batch) if len(share) else 0.0)
    return indices, weights


@contextlib.contextmanager
def frozen_in_bf16(model, enabled):
    """Keep the frozen weights of linear and conv layers in bf16 while training on CUDA: autocast caches its
    casts only of tensors that require grad, and would cast these ~86M values again at every forward. The result
    is the same (autocast runs those layers in bf16 anyway). The float32 originals wait in host memory, not on
    the GPU (0.34 GB for ViT-B, 2.5 GB for ViT-H), and come back on exit, for folding."""
    frozen = [
        p
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and enabled
        for p in m.parameters(recurse=False)
        if not p.requires_grad
    ]
    originals = [p.data.to("cpu") for p in frozen]
    for p in frozen:
        p.data = p.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for p, original in zip(frozen, originals):
            p.data = original.to(p.device)


def train_step(net, optimizer, params, images, labels, loss_weight):
    """Forward, backward, clip, AdamW. The loss is this process's summed loss times `loss_weight` (see shares).
    Returns it as a device tensor: no host sync here."""
    with autocast(images.device):
        loss = F.cross_entropy(net(data.normalize(images)), labels, reduction="sum") * loss_weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, loader, batch_size, ctx):
    """Test accuracy in %, counted on the device and summed over processes."""
    model.eval()
    indices, loss_weights = shares(torch.arange(len(loader)), batch_size, ctx)
    counts = torch.zeros(2, device=ctx.device)  # correct, total: one host sync at the end
    for images, labels in loader(
        [i for i, w in zip(indices, loss_weights) if w]
    ):  # weight 0: a stand-in, skipped
        with autocast(ctx.device):
            counts[0] += (model(data.normalize(images)).argmax(-1) == labels).sum()
        counts[1] += len(labels)
    if ctx.world > 1:
        dist.all_reduce(counts)
    model.train()
    return round(100 * (counts[0] / counts[1]).item(), 2)


# ---------------------------------------------------------------------------------------------------
# A run: set up, the loop, the end


def run_task(given, out, ctx, resume=None):
    """One run into `out`, fresh or continued from `resume` (a folder or its checkpoint.pth); returns its result.
    The cheap checks come first (settings, the folder, the data's presence), then the weights (perhaps a
    download), then the data (decoding)."""
    started = time.time()
    checkpoint = runs.read_checkpoint(resume, ctx.world) if resume else None
    if checkpoint:  # a run from before an option existed had its default
        checkpoint["config"] = {**paper.DEFAULTS, **checkpoint["config"]}
    cfg, sources, recipe_name = paper.settings(given, checkpoint and checkpoint["config"])
    done = checkpoint and runs.finished(out, cfg.epochs)
    if checkpoint:
        runs.check_resume(given, checkpoint["config"], len(checkpoint["history"]), out)
        runs.check_weights(given, checkpoint["config"], f"--resume {out}", needed=not done)
    runs.check_out(out, fresh=not checkpoint)
    with torch.device("meta"):  # the options against the model, before any data is decoded
        build_model(cfg, num_classes=1)
    ctx.log(
        f"{cfg.data}: {cfg.model} {cfg.method}, {recipe_name} recipe; "
        + ", ".join(
            f"{key} {getattr(cfg, key)} ({sources[key]})"
            for key in ("rank", "batch_size", "epochs", "img_size", "seed", *paper.RECIPE_KEYS)
            if sources[key] != "n/a"
        )
    )
    if done:
        ctx.log(
            f"{out} has finished its {cfg.epochs} epochs (--resume with more --epochs trains it for longer)"
        )
        return done["result"]
    data.check(cfg.data, cfg.data_dir)  # cheap: before anything is downloaded or decoded
    weights_path = runs.node_once(
        ctx, runs.weights_file, cfg.weights, cfg.model, ctx.log
    )  # before the decoding
    cfg.weights_bytes = (
        os.path.getsize(weights_path) if weights_path else 0
    )  # its identity on --resume, --eval-only
    task = runs.node_once(
        ctx, data.build, cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log
    )
    cfg.classes = task.classes
    if checkpoint:
        runs.check_classes(checkpoint["config"]["classes"], task, f"--resume {out}: the run")
    model = prepare_model(cfg, task.num_classes, weights_path, ctx.log).to(ctx.device)
    if (
        ctx.rank
    ):  # dropout and drop-path: each process draws its own masks, the first the one-process stream
        torch.manual_seed(
            cfg.seed * 1_000_003 + 7_919 * ctx.rank
        )  # apart from the data order's and crops' seeds
    params = [p for p in model.parameters() if p.requires_grad]
    ctx.log(
        f"{task.description}\n{cfg.model} {cfg.method}: {sum(p.numel() for p in params):,} trainable parameters; "
        f"{ctx.world} process(es) on {ctx.device}{', bf16 autocast' if ctx.device.type == 'cuda' else ''}; "
        f"output in {out}"
    )
    if ctx.rank == 0:
        os.makedirs(out, exist_ok=True)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=ctx.device.type == "cuda"
    )
    run = runs.Run(ctx, cfg, out, model, optimizer, history=[])
    if checkpoint:
        runs.restore_checkpoint(run, checkpoint)
    setup_seconds = time.time() - started
    train(run, task)
    return finish(run, task, setup_seconds)


def train(run, task):
    """The loop: for each epoch, for each batch: learning rate, forward, loss, backward, clip, step; then the
    epoch's loss (a nan stops the run), test, save and log."""
    ctx, cfg, model, optimizer = run.ctx, run.cfg, run.model, run.optimizer
    net, params = runs.distributed(model, ctx), [p for p in model.parameters() if p.requires_grad]
    train_data, test_data = data.Loader(task.train, ctx.device), data.Loader(task.test, ctx.device)
    steps = math.ceil(len(train_data) / cfg.batch_size)
    pace, checkpoints = (
        runs.Pace(ctx, (cfg.epochs - len(run.history)) * steps),
        runs.Checkpoints(run),
    )
    with runs.StopFlag() as stop, frozen_in_bf16(model, ctx.device.type == "cuda"):
        for epoch in range(len(run.history), cfg.epochs):
            started, losses = (
                time.time(),
                torch.zeros(steps, device=ctx.device),
            )  # read once, after the epoch
            order = torch.randperm(
                len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            )
            indices, loss_weights = shares(order, cfg.batch_size, ctx)
            for step, (images, labels) in enumerate(
                train_data(indices, seed=cfg.seed * 1000 + epoch)
            ):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps + step, cfg, steps)
                losses[step] = train_step(
                    net, optimizer, params, images, labels, loss_weights[step]
                )
                pace.step()
                if stop.is_set(ctx.control):
                    raise runs.Interrupted(stop.signum, epoch, checkpoints.epochs_saved)
            if ctx.world > 1:
                dist.all_reduce(losses)  # world times the batch means: see shares
            step_losses = (
                losses / ctx.world
            ).tolist()  # the epoch's one host sync: the GPU's work is done, timed
            diverged = [step for step, loss in enumerate(step_losses) if not math.isfinite(loss)]
            if diverged:
                raise UserError(
                    f"the loss became nan or infinite at epoch {epoch + 1}, step {diverged[0] + 1}; the "
                    f"last checkpoint ({run.out}/checkpoint.pth) is untouched. Try a lower --lr"
                )
            seconds = time.time() - started
            metrics = {
                "epoch": epoch + 1,
                "loss": round(sum(step_losses) / steps, 5),
                "lr": optimizer.param_groups[0]["lr"],
                "train_s": round(seconds, 2),
                "images_per_s": round(len(train_data) / seconds, 1),
            }
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics["test_acc"] = evaluate(model, test_data, 4 * cfg.batch_size, ctx)
                metrics["test_s"] = round(time.time() - started - metrics["train_s"], 2)
            metrics["elapsed_s"] = round(
                time.time() - started + (run.history[-1]["elapsed_s"] if run.history else 0), 1
            )
            run.history.append(metrics)
            stopping = stop.is_set(ctx.control)
            checkpoints.after_epoch(stopping)
            log_epoch(ctx, metrics, cfg.epochs)
            if stopping and epoch + 1 < cfg.epochs:
                raise runs.Interrupted(stop.signum, epoch + 1, checkpoints.epochs_saved)


def log_epoch(ctx, metrics, epochs):
    eta = metrics["elapsed_s"] / metrics["epoch"] * (epochs - metrics["epoch"])
    ctx.log(
        f"epoch {metrics['epoch']:3d}/{epochs}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
        f"{metrics['images_per_s']:7.1f} img/s  elapsed {runs.fmt_time(metrics['elapsed_s'])}  "
        f"eta {runs.fmt_time(eta)}"
        + (f"  test {metrics['test_acc']:.2f}%" if "test_acc" in metrics else "")
    )


def finish(run, task, setup_seconds):
    """adapters.pth; the adapters folded into the weights, checked on test images; folded.pth; a summary.
    Returns the result: final and best accuracy, trainable parameters, seconds."""
    started, tested = time.time(), [m["test_acc"] for m in run.history if "test_acc" in m]
    trained = runs.trained_tensors(run.model)
    result = {
        "final": tested[-1],
        "best": max(tested),
        "trainable": sum(v.numel() for v in trained.values()),
        "seconds": {
            "setup": round(setup_seconds, 1),
            "training": round(sum(m["train_s"] for m in run.history), 1),
            "testing": round(sum(m.get("test_s", 0) for m in run.history), 1),
        },
    }
    if not folds(run.cfg):
        run.ctx.log(
            "adapters not folded: with --swin-ffn-adapter residual (the official ARC Swin's placement) the "
            "FFN adapter transforms the residual stream, which no weight can absorb; adapters.pth is the run"
        )
    elif run.cfg.method in ("arc", "arc_att"):
        run.ctx.log(fold_and_compare(run.model, task.test, run.ctx.device))
    result["seconds"]["finish"] = round(time.time() - started, 1)
    record = {
        **vars(run.cfg),
        "result": result,
        "folded": folds(run.cfg),
    }  # runs.finished asks for folded.pth
    adapters, folded = os.path.join(run.out, "adapters.pth"), os.path.join(run.out, "folded.pth")
    if (
        run.ctx.rank == 0
    ):  # folded.pth: the plain architecture, whatever the method (--eval-only reads it so)
        if folds(run.cfg):
            runs.save_atomic(
                {
                    "config": {**record, "method": "folded", "trained_with": run.cfg.method},
                    "state_dict": {k: v.cpu() for k, v in run.model.state_dict().items()},
                },
                folded,
            )
        runs.save_atomic(
            {"config": record, "state_dict": trained}, adapters
        )  # last: the run is done
        run.ctx.log(
            f"summary: {run.cfg.model} {run.cfg.method} on {run.cfg.data}: {result['trainable']:,} trainable "
            f"parameters, final test accuracy {result['final']:.2f}%, best over evaluated epochs "
            f"{result['best']:.2f}% (selected on the test set, as the official code reports), "
            f"{runs.fmt_time(run.history[-1]['elapsed_s'])} training and testing\nsaved {adapters} "
            f"({os.path.getsize(adapters) / 1e6:.2f} MB)" + f" and {folded}" * folds(run.cfg)
        )
    return result


@torch.no_grad()
def fold_and_compare(model, test_split, device, n=64):
    """Fold the adapters into the weights, comparing float32 logits of the first n test images before and after:
    cheaper than testing twice, no bf16 near-tie can hide or fake a difference, and only n images are sent."""
    model.eval()
    images = data.normalize(test_split.images[:n].to(device))
    before = model(images)
    arc.reparameterize(model)
    gap, scale = torch.stack([(model(images) - before).abs().max(), before.abs().max()]).tolist()
    agree = "(they agree)" if gap <= 1e-3 * scale + 1e-5 else "MISMATCH: please report this"
    return (
        f"adapters folded into the weights: float32 logits of {len(images)} test images within {gap:.1e} of the "
        f"unfolded model's (largest {scale:.2f}) {agree}"
    )


def eval_only(args, given, ctx):
    """Rebuild the model a checkpoint records and test it; the command line may say where its data and
    weights are now."""
    source = f"--checkpoint {args.checkpoint}"
    saved = runs.read_saved(
        args.checkpoint, "--checkpoint", ("config", "state_dict"), "an adapters.pth or folded.pth"
    )
    cfg = SimpleNamespace(
        **{
            **paper.DEFAULTS,
            **saved["config"],
            **{k: v for k, v in given.items() if k in ("data_dir", "weights")},
        }
    )
    cfg.data = given["data"] if "data" in given and data.is_path(cfg.data) else cfg.data
    data.check(cfg.data, cfg.data_dir)
    if cfg.method == "folded":
        model = build_model(SimpleNamespace(**{**vars(cfg), "method": "full"}), len(cfg.classes))
        try:
            model.load_state_dict(saved["state_dict"])
        except RuntimeError as e:
            raise UserError(
                f"{source} does not fit {cfg.model}: {' '.join(str(e).split())[:300]}"
            ) from None
    else:
        runs.check_weights(given, saved["config"], source)
        model = prepare_model(
            cfg, len(cfg.classes), runs.weights_file(cfg.weights, cfg.model, ctx.log), ctx.log
        )
        runs.load_trained_tensors(model, saved["state_dict"], args.checkpoint)
    task = data.build(cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    runs.check_classes(cfg.classes, task, source)
    accuracy = evaluate(
        model.to(ctx.device), data.Loader(task.test, ctx.device), 4 * cfg.batch_size, ctx
    )
    ctx.log(
        f"{args.checkpoint}: {cfg.model} {cfg.method} on {cfg.data}: test accuracy {accuracy:.2f}%"
    )
    return accuracy


# ---------------------------------------------------------------------------------------------------


def default_out(given):
    """runs/<data>_<model>_<method>; a task list's entries joined by '+', each folder by its own name."""
    setting = {**paper.DEFAULTS, **given}
    tasks = "+".join(
        os.path.basename(os.path.normpath(task)) for task in setting["data"].split(",")
    )
    return os.path.join("runs", f"{tasks}_{setting['model']}_{setting['method']}")


def main(argv=None):
    args, given = parse_args(argv)
    ctx = runs.setup_distributed(args.device, args.workers)
    resume = args.resume and os.path.abspath(args.resume)
    folder = resume and runs.run_folder(resume)
    in_suite = bool(folder) and os.path.isfile(
        os.path.join(folder, "suite.json")
    )  # --resume names a suite's folder
    suite = in_suite or bool(paper.suite_tasks(given.get("data", "")))
    out = folder or args.out or default_out(given)
    try:
        if args.eval_only:
            return eval_only(args, given, ctx)
        if suite:
            return paper.run_suite(given, out, ctx, bool(resume), run_task)
        return run_task(given, out, ctx, resume)
    except (UserError, data.DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    except runs.Interrupted as e:
        if ctx.rank == 0:
            print(
                f"\n{e}. {runs.continue_with(e.epochs_saved or suite, out, ctx)}", file=sys.stderr
            )
        sys.exit(e.exit_code)
    except (
        KeyboardInterrupt
    ):  # before training began, or a second Ctrl-C: checkpoints are written atomically
        print(
            "\nstopped at once; checkpoint.pth, if there is one, holds the last epoch it saved",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
