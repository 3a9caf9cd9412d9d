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
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import arc
import data
import runs  # the plumbing around the loop: files, resume, stop requests, processes, suites
import swin
import vit
from runs import UserError

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
        raise UserError(f"{runs.flag(unused)} does not apply to {cfg['model']}: --vit-dropout is for ViTs, "
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
    runs.check_options(args, p.error)
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    if args.weights not in (None, "auto", "none"):
        args.weights = os.path.abspath(args.weights)
    if args.data and data.is_path(args.data):
        args.data = os.path.abspath(args.data)
    return args, {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}


# ---------------------------------------------------------------------------------------------------
# The model: built, loaded, frozen but for what the method trains


def build_model(cfg, num_classes):
    kw = dict(dropout=cfg.vit_dropout) if cfg.model.startswith("vit") else dict(drop_path=cfg.drop_path)
    try:
        return MODELS[cfg.model](num_classes=num_classes, img_size=cfg.img_size, rank=cfg.rank, **kw,
                                 arc=cfg.method if cfg.method in ("arc", "arc_att") else None,
                                 adapter_dropout=cfg.adapter_dropout)
    except ValueError as e:
        raise UserError(f"--img-size {cfg.img_size} does not suit --model {cfg.model}: {e}") from None


def prepare_model(cfg, num_classes, weights_path):
    """The model of `cfg` with its pretrained weights, and only what its method trains trainable."""
    torch.manual_seed(cfg.seed)  # with --weights none the frozen backbone is the seed's random init
    model = build_model(cfg, num_classes)
    runs.load_weights(model, cfg.model, cfg.weights, weights_path)
    mark_trainable(model, cfg.method)
    return model


def mark_trainable(model, method):
    if method in ("arc", "arc_att"):
        return arc.mark_trainable(model)
    for name, param in model.named_parameters():
        param.requires_grad_(method == "full" or name.startswith("head."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


def train_step(net, optimizer, params, images, labels, loss_weight):
    """Forward, backward, clip, AdamW. `loss_weight` turns the summed loss of this process's images into its
    part of the batch mean (runs.shares). Returns the loss as a device tensor: no host sync here."""
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
    indices, loss_weights = runs.shares(torch.arange(len(loader)), batch_size, ctx)
    counts = torch.zeros(2, device=ctx.device)  # correct, total: one host sync at the end
    for images, labels in loader([i for i, w in zip(indices, loss_weights) if w]):  # weight 0: a stand-in image
        with autocast(ctx.device):
            counts[0] += (model(data.normalize(images)).argmax(-1) == labels).sum()
        counts[1] += len(labels)
    if ctx.world > 1:
        dist.all_reduce(counts)
    model.train()
    return round(100 * (counts[0] / counts[1]).item(), 2)


# ---------------------------------------------------------------------------------------------------
# A run: set up, the loop, the end


class Run(SimpleNamespace):
    """One run's state: ctx (where this process runs), cfg (settings), out (its folder), model, task, params
    (what trains), optimizer, history (a metrics dict per finished epoch), seconds (where the time went).
    runs.save_checkpoint and runs.restore_checkpoint read and write these fields."""


def run_task(given, out, ctx, resume=None, task=None):
    """One run into `out`, fresh or continued from `resume` (a folder or its checkpoint.pth); returns its result.
    The cheap checks come first (settings, the folder, the data's presence), then the weights (perhaps a
    download), then the data (decoding). `task`: a data.Task to use instead of --data (bench.py)."""
    started = time.time()
    checkpoint = runs.read_checkpoint(resume, ctx.world) if resume else None
    cfg, sources, recipe_name = settings(given, checkpoint and checkpoint["config"])
    done = checkpoint and runs.finished(out)
    finished = bool(done) and done["epochs"] == cfg.epochs == len(checkpoint["history"])
    if checkpoint:
        runs.check_resume(given, checkpoint["config"], len(checkpoint["history"]), out)
        runs.check_weights(given, checkpoint["config"], f"--resume {out}", needed=not finished)
    runs.check_out(out, fresh=not checkpoint)
    with torch.device("meta"):  # the options against the model, before any data is decoded
        build_model(cfg, num_classes=1)
    ctx.log(f"{cfg.data}: {cfg.model} {cfg.method}, {recipe_name} recipe; " + ", ".join(
        f"{key} {getattr(cfg, key)} ({sources[key]})" for key in ("rank", "batch_size", "epochs", "img_size", "seed",
                                                                  *RECIPE_KEYS) if sources[key] != "n/a"))
    if finished:
        ctx.log(f"{out} has finished its {cfg.epochs} epochs (--resume with more --epochs trains it for longer)")
        return done["result"]
    if task is None:
        runs.check_data(cfg.data, cfg.data_dir)
    weights_path = runs.node_first(ctx, runs.weights_file, cfg.weights, cfg.model)  # a download before the decoding
    cfg.weights_bytes = os.path.getsize(weights_path) if weights_path else 0  # its identity on --resume, --eval-only
    task = task or runs.node_first(ctx, data.build, cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    cfg.classes = task.classes
    if checkpoint:
        runs.check_classes(checkpoint["config"]["classes"], task, f"--resume {out}: the run")
    model = prepare_model(cfg, task.num_classes, weights_path).to(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    ctx.log(f"{task.description}\n{cfg.model} {cfg.method}: {sum(p.numel() for p in params):,} trainable parameters; "
            f"{ctx.world} process(es) on {ctx.device}{', bf16 autocast' if ctx.device.type == 'cuda' else ''}; "
            f"output in {out}")
    if ctx.rank == 0:
        os.makedirs(out, exist_ok=True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=ctx.device.type == "cuda")
    run = Run(ctx=ctx, cfg=cfg, out=out, model=model, task=task, params=params, optimizer=optimizer, history=[],
              seconds={"setup": time.time() - started})
    if checkpoint:
        runs.restore_checkpoint(run, checkpoint)
    train(run)
    return finish(run)


def train(run):
    """The loop: for each epoch, for each batch: learning rate, forward, loss, backward, clip, step; then
    test, save and log."""
    ctx, cfg, model, optimizer = run.ctx, run.cfg, run.model, run.optimizer
    net = runs.distributed(model, ctx)
    train_data, test_data = (data.Loader(split, ctx.device) for split in (run.task.train, run.task.test))
    steps = math.ceil(len(train_data) / cfg.batch_size)
    pace = runs.Pace(ctx, (cfg.epochs - len(run.history)) * steps)
    with runs.StopFlag() as stop, runs.frozen_in_bf16(model, ctx.device.type == "cuda"):
        for epoch in range(len(run.history), cfg.epochs):
            started, losses = time.time(), runs.LossMeter(ctx, steps)
            order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            indices, loss_weights = runs.shares(order, cfg.batch_size, ctx)
            for step, (images, labels) in enumerate(train_data(indices, seed=cfg.seed * 1000 + epoch)):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps + step, cfg, steps)
                losses.add(step, train_step(net, optimizer, run.params, images, labels, loss_weights[step]))
                pace.step()
                if stop.is_set(ctx.control):
                    raise runs.Interrupted(stop.signum, epoch)
            epoch_loss = losses.mean(epoch, run.out)  # the epoch's one host sync: the GPU's work is done, timed
            seconds = time.time() - started
            metrics = {"epoch": epoch + 1, "loss": epoch_loss, "lr": optimizer.param_groups[0]["lr"],
                       "train_s": round(seconds, 2), "images_per_s": round(len(train_data) / seconds, 1)}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics["test_acc"] = evaluate(model, test_data, 4 * cfg.batch_size, ctx)
                metrics["test_s"] = round(time.time() - started - metrics["train_s"], 2)
            metrics["elapsed_s"] = round(time.time() - started + (run.history[-1]["elapsed_s"] if run.history else 0), 1)
            run.history.append(metrics)
            runs.save_checkpoint(run)
            log_epoch(ctx, metrics, cfg.epochs)
            if stop.is_set(ctx.control) and epoch + 1 < cfg.epochs:
                raise runs.Interrupted(stop.signum, epoch + 1)


def log_epoch(ctx, metrics, epochs):
    eta = metrics["elapsed_s"] / metrics["epoch"] * (epochs - metrics["epoch"])
    ctx.log(f"epoch {metrics['epoch']:3d}/{epochs}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:7.1f} img/s  elapsed {runs.fmt_time(metrics['elapsed_s'])}  "
            f"eta {runs.fmt_time(eta)}" + (f"  test {metrics['test_acc']:.2f}%" if "test_acc" in metrics else ""))


def finish(run):
    """adapters.pth; the adapters folded into the weights, checked on test images; folded.pth; a summary.
    Returns the result: final and best accuracy, trainable parameters, seconds."""
    started, tested = time.time(), [m["test_acc"] for m in run.history if "test_acc" in m]
    result = {"final": tested[-1], "best": max(tested), "trainable": sum(p.numel() for p in run.params),
              "seconds": {"setup": round(run.seconds["setup"], 1),
                          "training": round(sum(m["train_s"] for m in run.history), 1),
                          "testing": round(sum(m.get("test_s", 0) for m in run.history), 1)}}
    trained = runs.trained_tensors(run.model)
    if run.cfg.method in ("arc", "arc_att"):
        run.ctx.log(fold_and_compare(run.model, data.Loader(run.task.test, run.ctx.device)))
    result["seconds"]["finish"] = round(time.time() - started, 1)
    record = {**vars(run.cfg), "result": result}
    adapters, folded = os.path.join(run.out, "adapters.pth"), os.path.join(run.out, "folded.pth")
    if run.ctx.rank == 0:  # folded.pth: the plain architecture, whatever the method (--eval-only reads it so)
        runs.save_atomic({"config": {**record, "method": "folded", "trained_with": run.cfg.method},
                          "state_dict": {k: v.cpu() for k, v in run.model.state_dict().items()}}, folded)
        runs.save_atomic({"config": record, "state_dict": trained}, adapters)  # last: the run is done
        run.ctx.log(f"summary: {run.cfg.model} {run.cfg.method} on {run.cfg.data}: {result['trainable']:,} trainable "
                    f"parameters, final test accuracy {result['final']:.2f}%, best over evaluated epochs "
                    f"{result['best']:.2f}% (selected on the test set, as the official code reports), "
                    f"{runs.fmt_time(run.history[-1]['elapsed_s'])} training and testing\nsaved {adapters} "
                    f"({os.path.getsize(adapters) / 1e6:.2f} MB) and {folded}")
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
    source = f"--checkpoint {args.checkpoint}"
    saved = runs.read_saved(args.checkpoint, "--checkpoint", ("config", "state_dict"), "an adapters.pth or folded.pth")
    cfg = SimpleNamespace(**{**saved["config"], **{k: v for k, v in given.items() if k in ("data_dir", "weights")}})
    cfg.data = given["data"] if "data" in given and data.is_path(cfg.data) else cfg.data
    runs.check_data(cfg.data, cfg.data_dir)
    if cfg.method == "folded":
        model = build_model(SimpleNamespace(**{**vars(cfg), "method": "full"}), len(cfg.classes))
        try:
            model.load_state_dict(saved["state_dict"])
        except RuntimeError as e:
            raise UserError(f"{source} does not fit {cfg.model}: {' '.join(str(e).split())[:300]}") from None
    else:
        runs.check_weights(given, saved["config"], source)
        model = prepare_model(cfg, len(cfg.classes), runs.weights_file(cfg.weights, cfg.model))
        runs.load_trained_tensors(model, saved["state_dict"], args.checkpoint)
    task = data.build(cfg.data, cfg.data_dir, cfg.img_size, ctx.workers, ctx.log)
    runs.check_classes(cfg.classes, task, source)
    accuracy = evaluate(model.to(ctx.device), data.Loader(task.test, ctx.device), 4 * cfg.batch_size, ctx)
    ctx.log(f"{args.checkpoint}: {cfg.model} {cfg.method} on {cfg.data}: test accuracy {accuracy:.2f}%")
    return accuracy


def run_suite(given, out, ctx, resume):
    """Each task in turn, in its own subfolder of `out`, with its own recipe; results.md and results.json
    after every task. Resumed, it skips finished tasks and continues the others; options given then apply
    to this invocation (suite.json keeps the ones the suite started with)."""
    results = {}
    for folder, options, resume_from in runs.plan_suite(given, out, ctx, resume, os.path.abspath(DEFAULTS["data_dir"])):
        results[os.path.basename(folder)] = run_task(options, folder, ctx, resume_from)
        if ctx.rank == 0:
            runs.write_results(out, results, options.get("model", DEFAULTS["model"]),
                               options.get("method", DEFAULTS["method"]))


# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    args, given = parse_args(argv)
    ctx = runs.setup_distributed(args.device, args.workers)
    resume = args.resume and os.path.abspath(args.resume)
    folder = resume and runs.run_folder(resume)
    in_suite = bool(folder) and os.path.isfile(os.path.join(folder, "suite.json"))  # --resume names a suite's folder
    suite = in_suite or bool(runs.suite_tasks(given.get("data", "")))
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
    except runs.Interrupted as e:
        if ctx.rank == 0:
            print(f"\n{e}. {runs.continue_with(e.epochs_done or suite, out, ctx)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C: checkpoints are written atomically
        print("\nstopped at once; checkpoint.pth, if there is one, holds the last completed epoch", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
