"""Fine-tune a ViT or Swin with ARC, report test accuracy, fold the adapters away, save the result.

    python train.py --data dtd                      # VTAB-1k DTD, ViT-B/16 ImageNet-21k, the paper's recipe
    python train.py --data synthetic --model vit_t16 --weights none --img-size 32 --epochs 10 --warmup-epochs 1
                                                    # a ten-second smoke run on the CPU, no download
    python train.py --data dtd --resume runs/dtd_vit_b16_arc     # continue an interrupted run
    python train.py --eval-only --checkpoint runs/dtd_vit_b16_arc/adapters.pth
    torchrun --nproc_per_node=4 train.py --data dtd # several GPUs; --batch-size stays the global batch

Defaults are the official VTAB-1k recipe: AdamW lr 1e-2, weight decay 0, batch 32, 100 epochs,
10 warm-up epochs then cosine (per step), grad-norm clip 1.0, seed 42, r = 50, adapter dropout 0.1.
Writes to --out: metrics.jsonl (one line per epoch), checkpoint.pth (every epoch, for --resume),
adapters.pth (the trained tensors only) and folded.pth (the plain model with the adapters folded in).
"""
import argparse
import datetime
import functools
import json
import math
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import arc
import data
import swin
import vit

MODELS = {name: getattr(module, name) for module, names in
          ((vit, ("vit_t16", "vit_s16", "vit_b16", "vit_l16", "vit_h14")), (swin, ("swin_t", "swin_s", "swin_b", "swin_l")))
          for name in names}
URLS = {**vit.URLS, **swin.URLS}
# What defines a run: --resume refuses a checkpoint whose run differed in any of these.
RUN_ARGS = ("data", "model", "weights", "method", "rank", "adapter_dropout", "lr", "weight_decay", "batch_size",
            "epochs", "warmup_epochs", "img_size", "seed")


class UserError(Exception):
    """A mistake in the command, the data or the files: reported as one line, without a traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: sys.exit(f"error: {message} (python train.py --help lists the options)")
    p.add_argument("--data", default="dtd", help="dtd, a VTAB-1k task, an FGVC set, a folder, or synthetic")
    p.add_argument("--data-dir", default=None, help="where datasets are looked for and downloaded (./data)")
    p.add_argument("--model", default="vit_b16", choices=sorted(MODELS))
    p.add_argument("--weights", default="auto", help="auto (download the ImageNet-21k checkpoint), a path, or none")
    p.add_argument("--method", default="arc", choices=["arc", "arc_att", "linear", "full"])
    p.add_argument("--rank", type=int, default=50, help="ARC bottleneck r")
    p.add_argument("--adapter-dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, over all processes")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=10, help="evaluate on the test set every N epochs (and at the end)")
    p.add_argument("--out", default=None, help="output folder (default runs/<data>_<model>_<method>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--resume", default=None, help="an output folder or checkpoint.pth to continue from")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (adapters.pth or folded.pth)")
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args(argv)
    for name, low in (("rank", 1), ("batch_size", 1), ("epochs", 1), ("img_size", 1), ("eval_every", 1),
                      ("warmup_epochs", 0), ("workers", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(args, name)}")
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} must be less than --epochs {args.epochs}, or the learning "
                f"rate never decays")
    for name in ("lr", "weight_decay"):
        if not getattr(args, name) >= 0:  # also refuses nan
            p.error(f"--{name.replace('_', '-')} must be a non-negative number, not {getattr(args, name)}")
    if not 0 <= args.adapter_dropout < 1:
        p.error(f"--adapter-dropout must be in [0, 1), not {args.adapter_dropout}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device} is not a device: cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.eval_only != bool(args.checkpoint):
        p.error("--eval-only and --checkpoint go together: --eval-only --checkpoint runs/<run>/adapters.pth")
    if args.weights not in ("auto", "none"):
        args.weights = os.path.abspath(args.weights)  # so that --resume compares files, not spellings
    if args.out is None:
        args.out = os.path.join("runs", f"{os.path.basename(os.path.normpath(args.data))}_{args.model}_{args.method}")
    return args


# ---------------------------------------------------------------------------------------------------
# Model and weights


def build_model(config, num_classes):
    adapters = config["method"] if config["method"] in ("arc", "arc_att") else None
    try:
        return MODELS[config["model"]](num_classes=num_classes, img_size=config["img_size"], arc=adapters,
                                       rank=config["rank"], adapter_dropout=config["adapter_dropout"])
    except ValueError as e:
        raise UserError(f"--img-size {config['img_size']} does not suit --model {config['model']}: {e}") from None


def weights_path(weights, model_name):
    """The file --weights names (None for 'none'); 'auto' downloads the published checkpoint once into
    torch hub's cache."""
    if weights == "none":
        return None
    if weights != "auto":
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: no such file")
        return weights
    if model_name not in URLS:
        raise UserError(f"no published ImageNet-21k checkpoint for {model_name}: pass --weights PATH or --weights none")
    url = URLS[model_name]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(path):
        print(f"downloading {url}\n         to {path}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, progress=True)  # writes a temporary file, then renames
        except Exception as e:
            raise UserError(f"could not download the {model_name} weights ({type(e).__name__}: {e}). Looked for "
                            f"{path}: download {url} by hand and put it there, or pass --weights PATH") from None
    return path


def load_weights(model, model_name, path):
    if path is None:
        return
    loader = vit.load_pretrained if model_name.startswith("vit") else swin.load_pretrained
    try:
        loader(model, path)
    except arc.CheckpointError as e:
        raise UserError(f"--weights {e}") from None


def mark_trainable(model, method):
    if method in ("arc", "arc_att"):
        return arc.mark_trainable(model)
    for name, param in model.named_parameters():
        param.requires_grad_(method == "full" or name.startswith("head."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_tensors(model):
    """What the method trains (for ARC: arc.arc_state_dict); linear and full train other tensors."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trained_tensors(model, state_dict, source):
    expected = trained_tensors(model).keys()
    if expected != state_dict.keys():
        raise UserError(f"{source} does not fit this model: missing {sorted(expected - state_dict.keys())[:4]}, "
                        f"unexpected {sorted(state_dict.keys() - expected)[:4]}")
    model.load_state_dict(state_dict, strict=False)


# ---------------------------------------------------------------------------------------------------
# Data on the device: uint8 images in, normalised floats out


class Batches:
    """Index batches of a split, as uint8 on the device. Preloaded splits stay on the device whole, so a
    step is one gather; others are decoded by DataLoader workers (FGVC's random crops)."""

    def __init__(self, split, device, workers, img_size):
        self.split, self.device, self.workers = split, device, workers
        self.empty = (torch.empty(0, 3, img_size, img_size, dtype=torch.uint8, device=device),
                      torch.empty(0, dtype=torch.int64, device=device))
        if isinstance(split, data.Preloaded):
            self.images, self.labels = split.images.to(device), split.labels.to(device)

    def __len__(self):
        return len(self.split)

    def __call__(self, index_batches, seed=0):
        if isinstance(self.split, data.Preloaded):
            order = torch.cat(index_batches).to(self.device)  # one copy for the epoch, then slices of it
            for index in order.split([len(i) for i in index_batches]):
                yield self.images[index], self.labels[index]
            return
        self.split.seed = seed  # the epoch's random crops, whichever worker decodes which image
        loader = iter(torch.utils.data.DataLoader(
            self.split, batch_sampler=[i.tolist() for i in index_batches if len(i)], num_workers=self.workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator()))  # not the global (dropout) RNG
        for index in index_batches:
            if not len(index):  # under torchrun, a last batch smaller than the process count leaves some none
                yield self.empty
                continue
            images, labels = next(loader)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


@functools.cache
def mean_std(device):
    """ImageNet mean and std on `device`, made once: a tensor built from a list every step would be a
    blocking host-to-device copy every step."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (data.MEAN, data.STD))


def normalize(images):
    mean, std = mean_std(images.device)
    return (images.float() - mean) / std


def shares(order, batch_size, rank, world):
    """This process's share of each global batch of `order` (an order that is the same on every process)."""
    return [order[i: i + batch_size][rank::world] for i in range(0, len(order), batch_size)]


def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train_step(net, optimizer, params, images, labels, loss_scale):
    """Forward, backward, clip, AdamW. Returns the loss as a device tensor: no host sync here."""
    with autocast(images.device):
        loss = F.cross_entropy(net(normalize(images)), labels, reduction="sum") * loss_scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, batches, batch_size, rank=0, world=1, bf16=True):
    """Test accuracy in %, counted on the device and summed over processes."""
    model.eval()
    counts = torch.zeros(2, device=batches.device)  # correct, total: one host sync at the end
    for images, labels in batches(shares(torch.arange(len(batches)), batch_size, rank, world)):
        with autocast(batches.device, enabled=bf16):
            counts[0] += (model(normalize(images)).argmax(-1) == labels).sum()
        counts[1] += len(labels)
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return 100 * (counts[0] / counts[1]).item()


def autocast(device, enabled=True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# ---------------------------------------------------------------------------------------------------
# Distributed, checkpoints, signals


def setup_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process. Under torchrun a
    second, CPU (gloo) group carries control messages: stop requests and barriers that may wait out a
    download, without a GPU sync or NCCL's timeout."""
    if "RANK" not in os.environ:
        return torch.device(device_name), 0, 1, None
    cuda = device_name.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    return torch.device(f"cuda:{local_rank}" if cuda else "cpu"), dist.get_rank(), dist.get_world_size(), control


def node_first(control, fn, *args):
    """fn(*args) on each machine's first process, then on its others: a download into a shared folder
    happens once, and the others find it done."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    result = fn(*args) if first else None
    if control is not None:
        dist.barrier(group=control)
    return result if first else fn(*args)


def rng_states(device, control, world):
    """Every process's random state (CPU, and CUDA for dropout on a GPU), gathered for the checkpoint."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state, group=control)
    return states


def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interruption never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


class StopFlag:
    """While training, the first Ctrl-C or SIGTERM asks for a stop at the next step boundary; a second
    one stops at once."""

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


def read_saved(path, option, keys, what):
    """A file train.py wrote, holding at least the entries `keys`; `what` names the kind expected."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file") from None
    except Exception as e:
        raise UserError(f"{option} {path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(saved, dict) or not set(keys) <= saved.keys():
        raise UserError(f"{option} {path} is not {what} written by train.py")
    return saved


def read_run_checkpoint(path, world):
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pth")
    path = os.path.abspath(path)
    checkpoint = read_saved(path, "--resume", ("config", "trained", "optimizer", "rng"), "a checkpoint.pth (adapters.pth "
                            "and folded.pth hold results, not a run to continue)")
    if len(checkpoint["rng"]) != world:
        raise UserError(f"--resume: {path} was written by {len(checkpoint['rng'])} process(es); resume it with as "
                        f"many (torchrun --nproc_per_node={len(checkpoint['rng'])} for several)")
    return checkpoint, path


# ---------------------------------------------------------------------------------------------------
# The run


def train(args):
    started = time.time()
    device, rank, world, control = setup_distributed(args.device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    args.data_dir = args.data_dir or "./data"
    config = {k: getattr(args, k) for k in RUN_ARGS}
    resume = None
    if args.resume:
        resume, resume_path = read_run_checkpoint(args.resume, world)
        changed = [k for k in RUN_ARGS if resume["config"].get(k) != config[k]]
        if changed:
            raise UserError(f"--resume {resume_path} comes from another run: " + ", ".join(
                f"--{k.replace('_', '-')} {resume['config'].get(k)} there, {config[k]} here" for k in changed)
                + "; give the same options, or start a new run with another --out")
        args.out = os.path.dirname(resume_path)
    elif any(os.path.exists(os.path.join(args.out, f)) for f in ("checkpoint.pth", "metrics.jsonl", "adapters.pth")):
        raise UserError(f"{args.out} already holds a run: continue it with --resume {args.out}, or pass another --out")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must divide evenly over {world} processes")
    with torch.device("meta"):  # check the options against the model now, not after decoding the dataset
        build_model(config, num_classes=1)
    weights = node_first(control, weights_path, args.weights, args.model)

    torch.manual_seed(args.seed)
    task = node_first(control, data.build, args.data, args.data_dir, args.img_size, args.workers)
    model = build_model(config, task.num_classes)
    load_weights(model, args.model, weights)
    trainable = mark_trainable(model, args.method)
    model.to(device)
    if world > 1:
        torch.manual_seed(args.seed + rank)  # each process its own dropout; DDP gives all rank 0's weights
    train_batches = Batches(task.train, device, args.workers, args.img_size)
    test_batches = Batches(task.test, device, args.workers, args.img_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(train_batches) / args.batch_size)
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    start_epoch, start_step, best, elapsed = 0, 0, None, 0.0
    if resume:
        load_trained_tensors(model, resume["trained"], resume_path)
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        torch.set_rng_state(resume["rng"][rank]["cpu"])
        if device.type == "cuda" and resume["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(resume["rng"][rank]["cuda"], device)
        start_epoch, start_step, best, elapsed = resume["epoch"], resume["step"], resume["best"], resume["elapsed"]
        log(f"resuming {resume_path} at epoch {start_epoch + 1}, step {start_step}")
    net = model
    if world > 1:  # buffers (Swin's masks) are rebuilt identically by every process: no need to broadcast them
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    if is_main:
        os.makedirs(args.out, exist_ok=True)
    log(f"{task.description}\n{args.model} {args.method}: {trainable:,} trainable parameters; {world} process(es) "
        f"on {device}{', bf16 autocast' if device.type == 'cuda' else ''}; output in {args.out}")

    def checkpoint(epoch, step, loss_sum=0.0):
        rng = rng_states(device, control, world)  # a collective: every process takes part
        if is_main:
            save_atomic({"config": config, "trained": trained_tensors(model), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "rng": rng, "epoch": epoch, "step": step,
                         "loss_sum": loss_sum, "best": best, "elapsed": elapsed}, os.path.join(args.out, "checkpoint.pth"))

    with StopFlag() as stop:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            done = start_step if epoch == start_epoch else 0
            batches = shares(epoch_order(len(train_batches), args.seed, epoch), args.batch_size, rank, world)
            sizes = [min(args.batch_size, len(train_batches) - i * args.batch_size) for i in range(len(batches))]
            loss_sum = torch.full((), resume["loss_sum"] if resume and done and is_main else 0.0, device=device)
            first_nonfinite = torch.full((), len(batches), device=device)  # len(batches): none so far
            for step, (images, labels) in enumerate(train_batches(batches[done:], seed=args.seed * 1000 + epoch),
                                                    start=done):
                # A sum over this process's share scaled to the global batch: DDP's gradient mean is then
                # exactly the single-process gradient, even for an uneven last batch.
                loss = train_step(net, optimizer, params, images, labels, world / sizes[step])
                lr = optimizer.param_groups[0]["lr"]
                schedule.step()
                loss_sum += loss / world
                first_nonfinite = torch.where(torch.isfinite(loss), first_nonfinite, first_nonfinite.clamp(max=step))
                if stop.is_set(control) and step + 1 < len(batches):
                    check_finite(first_nonfinite, len(batches), epoch, args.out, world)
                    elapsed += time.time() - t0
                    if world > 1:
                        dist.all_reduce(loss_sum)
                    checkpoint(epoch, step + 1, loss_sum.item())
                    raise Interrupted(stop.signum, epoch, step + 1, args.out, world)
            check_finite(first_nonfinite, len(batches), epoch, args.out, world)
            if world > 1:
                dist.all_reduce(loss_sum)
            epoch_loss = loss_sum.item() / len(batches)  # the epoch's one host sync
            elapsed += time.time() - t0
            metrics = {"epoch": epoch + 1, "loss": round(epoch_loss, 5), "lr": lr,
                       "images_per_s": round(sum(sizes[done:]) / (time.time() - t0), 1), "elapsed_s": round(elapsed, 1)}
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                metrics["test_acc"] = round(evaluate(net, test_batches, 4 * args.batch_size, rank, world), 2)
                best = max(best or 0.0, metrics["test_acc"])
            eta = elapsed / (epoch + 1) * (args.epochs - epoch - 1)
            log(f"epoch {epoch + 1:3d}/{args.epochs}  loss {epoch_loss:.4f}  lr {lr:.2e}  "
                f"{metrics['images_per_s']:7.1f} img/s  elapsed {fmt_time(elapsed)}  eta {fmt_time(eta)}"
                + (f"  test {metrics['test_acc']:.2f}%" if "test_acc" in metrics else ""))
            if is_main:
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            checkpoint(epoch + 1, 0)
            if stop.is_set(control) and epoch + 1 < args.epochs:
                raise Interrupted(stop.signum, epoch + 1, 0, args.out, world)

    finish(args, config, model, task, test_batches, rank, world, best, elapsed, trainable, log, started)


def finish(args, config, model, task, test_batches, rank, world, best, elapsed, trainable, log, started):
    """Final accuracy, adapter checkpoint, folding, folded accuracy, summary. The two final accuracies are
    computed in float32: under bf16 a near-tie can round differently in the folded and unfolded model."""
    accuracy = evaluate(model, test_batches, 4 * args.batch_size, rank, world, bf16=False)
    meta = {**config, "data_dir": args.data_dir, "num_classes": task.num_classes}
    if rank == 0:
        save_atomic({"config": meta, "state_dict": trained_tensors(model)}, os.path.join(args.out, "adapters.pth"))
    if args.method in ("arc", "arc_att"):
        arc.reparameterize(model)
        folded_accuracy = evaluate(model, test_batches, 4 * args.batch_size, rank, world, bf16=False)
        log(f"\ntest accuracy {accuracy:.2f}% with adapters, {folded_accuracy:.2f}% folded into the weights"
            + (" (they agree)" if abs(accuracy - folded_accuracy) < 0.1 else " (MISMATCH: please report this)"))
    if rank == 0:  # the plain architecture, whatever the method: --eval-only reads it as "folded"
        save_atomic({"config": {**meta, "method": "folded", "trained_with": args.method}, "state_dict": model.state_dict()},
                    os.path.join(args.out, "folded.pth"))
        size = os.path.getsize(os.path.join(args.out, "adapters.pth")) / 1e6
        print(f"summary: {args.model} {args.method} on {args.data}: {trainable:,} trainable parameters, final test "
              f"accuracy {accuracy:.2f}%, best over evaluated epochs {best:.2f}% (selected on the test set, as the "
              f"official code reports), {fmt_time(elapsed)} training, {fmt_time(time.time() - started)} wall time in "
              f"this process\nsaved {args.out}/adapters.pth ({size:.2f} MB) and {args.out}/folded.pth")


def eval_only(args):
    """Rebuild the run a checkpoint records (model, method, data, image size) and test it. --data-dir, when
    given, says where its data is now."""
    device = torch.device(args.device)
    saved = read_saved(args.checkpoint, "--checkpoint", ("config", "state_dict"), "an adapters.pth or folded.pth")
    config, state_dict = saved["config"], saved["state_dict"]
    torch.manual_seed(config["seed"])  # with --weights none the frozen backbone is the seed's random init
    task = data.build(config["data"], args.data_dir or config["data_dir"], config["img_size"], args.workers)
    if config["method"] == "folded":
        model = build_model({**config, "method": "full"}, task.num_classes)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise UserError(f"--checkpoint {args.checkpoint} does not fit {config['model']}: "
                            f"{' '.join(str(e).split())[:300]}") from None
    else:
        model = build_model(config, task.num_classes)
        load_weights(model, config["model"], weights_path(config["weights"], config["model"]))
        mark_trainable(model, config["method"])
        load_trained_tensors(model, state_dict, args.checkpoint)
    batches = Batches(task.test, device, args.workers, config["img_size"])
    accuracy = evaluate(model.to(device), batches, 4 * args.batch_size, bf16=False)
    print(f"{args.checkpoint}: {config['model']} {config['method']} on {config['data']}: test accuracy {accuracy:.2f}%")
    return accuracy


def check_finite(first_nonfinite, none, epoch, out, world):
    """Stop when any process saw a nan or infinite loss (its gradient has reached every process)."""
    if world > 1:
        dist.all_reduce(first_nonfinite, op=dist.ReduceOp.MIN)
    step = int(first_nonfinite)
    if step < none:
        raise UserError(f"the loss became nan or infinite at epoch {epoch + 1}, step {step + 1}; the last good "
                        f"checkpoint ({out}/checkpoint.pth) is untouched. Try a lower --lr")


class Interrupted(Exception):
    def __init__(self, signum, epoch, step, out, world):
        argv = [a for i, a in enumerate(sys.argv) if not (a.startswith("--resume") or sys.argv[i - 1] == "--resume")]
        launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
        resume = " ".join(shlex.quote(a) for a in argv + ["--resume", out])
        where = f"after step {step} of epoch {epoch + 1}" if step else f"at the end of epoch {epoch}"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; saved {out}/checkpoint.pth. "
                         f"Continue with:\n  {launcher} {resume}")
        self.exit_code = 128 + signum


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def main(argv=None):
    args = parse_args(argv)
    try:
        return eval_only(args) if args.eval_only else train(args)
    except (UserError, data.DataError) as e:
        message = str(e)
        if isinstance(e, data.DataError) and "Traceback" in message:  # raised in a DataLoader worker, wrapped
            message = message.strip().splitlines()[-1].split("DataError: ")[-1]
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C: checkpoints are written atomically
        print(f"\nstopped at once; {args.out}/checkpoint.pth, if there is one, holds the last completed epoch",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
