"""A run's life around its training loop (train.py's, with the step): the processes it runs in, stop requests,
its folder and files, checkpoints with the random states, resuming, its weights file, the line on its pace.

    ctx = setup_distributed("cuda", workers=8)       # one process, or one of torchrun's
    check_out(out, fresh=True)                       # before hours of decoding: can the run be written there?
    run = Run(ctx, cfg, out, model, optimizer, history=[]); restore_checkpoint(run, read_checkpoint(path, ctx.world))
    checkpoints = Checkpoints(run); ... checkpoints.after_epoch(stopping)   # checkpoint.pth and metrics.jsonl
    with StopFlag() as stop: ... if stop.is_set(ctx.control): raise Interrupted(stop.signum, epoch, epochs_saved)

Every file is written atomically (a temporary file, then a rename), so an interruption or a full disk
never leaves half a file. A mistake in the command, the data or the files raises UserError: train.py
prints it as one line, without a traceback.
"""

import datetime
import inspect
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import swin
import vit


class UserError(Exception):
    """A mistake in the command, the data or the files: reported as one line, without a traceback."""


def flag(key):
    return "--" + key.replace("_", "-")


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


# ---------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Context:
    """Where this process runs: its device, the decoding workers it may start, its rank among `world` processes,
    `control`: the gloo group for stop requests and barriers (None alone), `log`: print on the first process only."""

    device: torch.device
    workers: int
    rank: int = 0
    world: int = 1
    control: object | None = None
    log: Callable = print


def setup_distributed(device_name, workers):
    """Where this process runs: alone, or as one of torchrun's (RANK, WORLD_SIZE, LOCAL_RANK). A second, CPU
    (gloo) group carries stop requests and barriers that may wait out a download, free of GPU syncs, NCCL's timeout."""
    ctx = Context(torch.device(device_name), workers)
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


def node_once(ctx, fn, *args):
    """fn(*args) computed once a machine, by its first process (a download, a dataset decoded), which hands the
    result to the machine's others through a private file in the temporary folder, which they read memory-mapped:
    one copy in the page cache. Where the file cannot be written (a small TMPDIR), each computes it itself."""
    if ctx.control is None or os.environ.get("LOCAL_WORLD_SIZE") == "1":
        return fn(*args)
    first, path = os.environ.get("LOCAL_RANK", "0") == "0", None
    try:
        if first:
            result = fn(*args)
            handle, path = tempfile.mkstemp(prefix="arc-", suffix=".pt")
            os.close(handle)
            try:
                torch.save((result,), path)
            except (OSError, RuntimeError):  # torch.save reports a full disk as a RuntimeError
                os.remove(path)
                path = None
        paths = [None] * ctx.world  # each machine's file, found by the machine's name
        dist.all_gather_object(paths, (socket.gethostname(), path), group=ctx.control)
        if not first:
            path = next((p for host, p in paths if p and host == socket.gethostname()), None)
            result = (
                torch.load(path, mmap=True, weights_only=False)[0] if path else fn(*args)
            )  # our own file
        dist.barrier(group=ctx.control)  # all have read it
    finally:
        if first and path:
            os.remove(path)  # the others' mappings outlive the name
    return result


# Buffers (Swin's masks) are rebuilt alike by every process, so DDP need not sync them at each forward.
# torch 2.13 renamed the option.
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def distributed(model, ctx):
    """The model as the loop calls it: itself, or wrapped in DDP under torchrun."""
    if ctx.world == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        **NO_BUFFER_SYNC,
    )


# ---------------------------------------------------------------------------------------------------
# Around the loop: the pace, stop requests


LONG_RUN_S = 3600  # on a CPU, a run longer than this gets advice


class Pace:
    """After the first steps, one line: how long the steps to go will take, and, when that is long on a CPU,
    what would be quicker. The first step pays for start-up, so the five after it are timed."""

    def __init__(self, ctx, steps_to_go):
        self.ctx, self.steps_to_go, self.done = ctx, steps_to_go, 0

    def step(self):
        self.done += 1
        if self.done in (1, 6) and self.ctx.device.type == "cuda":
            torch.cuda.synchronize(
                self.ctx.device
            )  # twice a run: the clock needs the GPU's work done
        if self.done == 1:
            self.start = time.time()
        elif self.done == 6:
            per_step = (time.time() - self.start) / 5
            seconds = per_step * (self.steps_to_go - 6)
            advice = (
                "; that is long: for a quick run try --model vit_t16, or a GPU with --device cuda"
                if self.ctx.device.type == "cpu" and seconds > LONG_RUN_S
                else ""
            )
            self.ctx.log(
                f"{per_step:.2f} s a step: about {fmt_time(seconds)} for the {self.steps_to_go - 6:,} steps "
                f"to go, without testing{advice}"
            )


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
    """A stop asked for by a signal, after `epochs_done` epochs, of which checkpoint.pth holds `epochs_saved`."""

    def __init__(self, signum, epochs_done, epochs_saved):
        lost = f" ({epochs_done - epochs_saved} since the last checkpoint will run again)" * (
            epochs_saved < epochs_done
        )
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after {epochs_done} epoch(s){lost}"
        )
        self.exit_code, self.epochs_saved = 128 + signum, epochs_saved


def continue_with(saved, out, ctx):
    """How to go on after a stop: --resume when something was saved, else the same command again."""
    argv = [
        a
        for i, a in enumerate(sys.argv)
        if not (a.startswith("--resume") or sys.argv[i - 1] == "--resume")
    ]
    launcher = f"torchrun --nproc_per_node={ctx.world}" if ctx.world > 1 else "python"
    if not saved:
        return f"No epoch had finished, so nothing is saved. Start again with:\n  {launcher} {shlex.join(argv)}"
    return (
        f"What was saved is in {out} (an epoch in progress starts again). Continue with:\n  "
        f"{launcher} {shlex.join(argv + ['--resume', out])}"
    )


# ---------------------------------------------------------------------------------------------------
# Files: the output folder, atomic writes, what a run saves


def check_out(out, fresh):
    """Fail now, not after an hour of decoding, when the output folder holds a run that a fresh one would
    overwrite, or cannot be made or written."""
    if fresh and any(
        os.path.exists(os.path.join(out, name))
        for name in ("checkpoint.pth", "adapters.pth", "folded.pth", "suite.json")
    ):
        raise UserError(
            f"{out} already holds a run: continue it with --resume {out}, or pass another --out"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: pass another --out")
    parent = os.path.abspath(out)
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise UserError(
                f"--out {out}: {parent} is a file, so no folder can be made there; pass another --out"
            )
        parent = os.path.dirname(parent)
    try:
        os.rmdir(
            tempfile.mkdtemp(dir=parent)
        )  # what os.access cannot tell: a read-only mount, sysfs, a full disk
    except OSError as e:
        raise UserError(
            f"--out {out}: cannot write in {parent} ({e.strerror}); pass another --out"
        ) from None


def save_atomic(obj, path):
    """Text, or what torch.save takes, written to path.tmp then renamed: never half a file (a stop, a full disk)."""
    try:
        if isinstance(obj, str):
            with open(path + ".tmp", "w") as f:
                f.write(obj)
        else:
            torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (
        BaseException
    ) as e:  # a full disk, or a Ctrl-C mid-write: no temporary file is left (1 GB for full ViT-B)
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        if not isinstance(
            e, (OSError, RuntimeError)
        ):  # torch.save reports a full disk as a RuntimeError
            raise
        raise UserError(
            f"could not write {path} ({getattr(e, 'strerror', None) or e}); what was there is intact"
        ) from None


def read_saved(path, option, keys, what):
    """A file train.py wrote, holding at least the entries `keys`; `what` names the kind expected."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file") from None
    except Exception:
        raise UserError(f"{option} {path} is unreadable: it is {vit.describe_file(path)}") from None
    if not isinstance(saved, dict) or not set(keys) <= saved.keys():
        raise UserError(f"{option} {path} is not {what} written by train.py")
    return saved


def trained_tensors(model):
    """What the method trains (for ARC: arc.arc_state_dict); linear and full train other tensors."""
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trained_tensors(model, state_dict, source):
    expected = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k]
    ]
    if expected.keys() != state_dict.keys() or wrong:
        raise UserError(
            f"{source} does not fit this model: missing {sorted(expected.keys() - state_dict.keys())[:4]}, "
            f"unexpected {sorted(state_dict.keys() - expected.keys())[:4]}, shapes (file vs model) {wrong[:2]}"
        )
    model.load_state_dict(state_dict, strict=False)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: a run's state, saved and restored


@dataclass
class Run:
    """A run in training. checkpoint.pth saves its settings (cfg), what its model trains, the optimizer's state,
    its history (a metrics dict per finished epoch) and every process's random state; into `out`."""

    ctx: Context
    cfg: SimpleNamespace
    out: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    history: list


def save_checkpoint(run):
    """checkpoint.pth: everything that resuming needs, so that a resumed run ends as an uninterrupted one."""
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(run.ctx.device) if run.ctx.device.type == "cuda" else None,
    }
    states = [rng]
    if run.ctx.world > 1:  # every process's random state (its dropout), gathered: a collective
        states = [None] * run.ctx.world
        dist.all_gather_object(states, rng, group=run.ctx.control)
    if run.ctx.rank == 0:
        save_atomic(
            {
                "config": vars(run.cfg),
                "trained": trained_tensors(run.model),
                "rng": states,
                "optimizer": run.optimizer.state_dict(),
                "history": run.history,
            },
            os.path.join(run.out, "checkpoint.pth"),
        )


def restore_checkpoint(run, checkpoint):
    load_trained_tensors(run.model, checkpoint["trained"], os.path.join(run.out, "checkpoint.pth"))
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"][run.ctx.rank]
    torch.set_rng_state(rng["cpu"])
    if run.ctx.device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.ctx.device)
    run.history = checkpoint["history"]
    if checkpoint["config"]["epochs"] != run.cfg.epochs:
        run.history[-1]["schedule"] = (
            f"then extended from {checkpoint['config']['epochs']} to {run.cfg.epochs} epochs"
        )
        run.ctx.log(
            f"extending the run: the cosine schedule is recomputed for {run.cfg.epochs} epochs"
        )
    run.ctx.log(f"resuming {run.out} after epoch {len(run.history)}")


class Checkpoints:
    """After each epoch: checkpoint.pth, unless the last took over a tenth of the time since it was written (--method
    full, big model, short epochs); always after the last epoch and on a stop. Then metrics.jsonl, from the history:
    a run killed in between resumes from the checkpoint and writes it again, an epoch a line."""

    def __init__(self, run):
        self.run, self.epochs_saved = run, len(run.history)
        self.written, self.cost = (
            time.time(),
            0.0,
        )  # when the last was written, and how long that took

    def after_epoch(self, stopping):
        run = self.run
        due = (
            stopping
            or len(run.history) == run.cfg.epochs
            or time.time() - self.written >= 10 * self.cost
        )
        if (
            run.ctx.control is not None
        ):  # every process takes part in a save (it gathers their random states)
            flag = torch.tensor([int(due)])
            dist.broadcast(
                flag, src=0, group=run.ctx.control
            )  # the first process's clock decides for all
            due = bool(flag)
        if due:
            started = time.time()
            save_checkpoint(run)
            self.written, self.cost, self.epochs_saved = (
                time.time(),
                time.time() - started,
                len(run.history),
            )
        if run.ctx.rank == 0:
            save_atomic(
                "".join(json.dumps(m) + "\n" for m in run.history),
                os.path.join(run.out, "metrics.jsonl"),
            )


# ---------------------------------------------------------------------------------------------------
# Resuming: the run --resume names, and what may change


def run_folder(path):
    """The folder --resume names: itself, or a file's (a mistyped folder stays itself, to be reported missing)."""
    return os.path.dirname(path) if os.path.isfile(path) or path.endswith(".pth") else path


def read_checkpoint(path, world):
    """The checkpoint.pth of the run folder --resume names (or that file itself)."""
    folder = run_folder(path)
    path = os.path.join(path, "checkpoint.pth") if folder == path else path
    if not os.path.exists(folder):
        raise UserError(f"--resume {folder}: no such folder")
    if not os.path.exists(path):
        raise UserError(
            f"--resume {folder}: no checkpoint.pth there, so no finished epoch to continue; start the "
            f"run again without --resume"
        )
    checkpoint = read_saved(
        path,
        "--resume",
        ("config", "trained", "optimizer", "rng", "history"),
        "a checkpoint.pth (adapters.pth and folded.pth hold results, not a run to continue)",
    )
    if len(checkpoint["rng"]) != world:
        raise UserError(
            f"--resume: {path} was written by {len(checkpoint['rng'])} process(es); resume it with as "
            f"many (torchrun --nproc_per_node={len(checkpoint['rng'])} for several)"
        )
    return checkpoint


def finished(out, epochs=None):
    """The record of the run in `out` (its adapters.pth config, written last) if it has finished: trained for `epochs`
    (if given), not continued since, and its folded.pth written unless it could not fold; else None."""
    adapters, checkpoint = os.path.join(out, "adapters.pth"), os.path.join(out, "checkpoint.pth")
    if not os.path.exists(adapters):
        return None
    record = read_saved(adapters, "--resume", ("config",), "an adapters.pth")["config"]
    folded = record.get(
        "folded", record.get("swin_ffn_adapter") != "residual" or record["method"] != "arc"
    )
    try:  # the epochs checkpoint.pth holds (0: deleted; more: continued since); unreadable: --resume reports it
        saved = (
            len(torch.load(checkpoint, mmap=True, weights_only=True)["history"])
            if os.path.exists(checkpoint)
            else 0
        )
    except Exception:
        return None
    if epochs is not None and record["epochs"] != epochs or saved > record["epochs"]:
        return None
    return record if not folded or os.path.exists(os.path.join(out, "folded.pth")) else None


MAY_CHANGE = (
    "data_dir",
    "eval_every",
    "epochs",
    "weights",
)  # where files are now, how often to test; more epochs


def check_resume(given, saved, done, out):
    """A run continues with its own settings. The command line may say where its files are now, how often to
    test, and --epochs, which may grow: the schedule is then recomputed for the new length."""
    changed = [
        key
        for key in given
        if key not in MAY_CHANGE
        and given[key] != saved[key]
        and not (key == "data" and data.is_path(given[key]) and data.is_path(saved[key]))
    ]
    if changed:
        raise UserError(
            f"--resume {out} comes from another run: "
            + ", ".join(f"{flag(key)} {saved[key]} there, {given[key]} here" for key in changed)
            + "; give the same options, or start a new run with another --out"
        )
    if given.get("epochs", saved["epochs"]) < saved["epochs"]:
        raise UserError(
            f"--resume {out} is a run of {saved['epochs']} epochs ({done} done): --epochs "
            f"{given['epochs']} would shorten it; a run can only be extended"
        )


def check_classes(classes, task, source):
    if classes != task.classes:
        raise UserError(
            f"{source} was trained on {len(classes)} classes {classes[:5]}, "
            f"the data has {task.num_classes} {task.classes[:5]}"
        )


# ---------------------------------------------------------------------------------------------------
# Weights files

URLS = {
    **vit.URLS,
    **swin.URLS,
}  # the published checkpoint of each model, which --weights auto downloads


def weights_file(weights, model_name, log):
    """The file --weights names (None for 'none'); 'auto': the published checkpoint the official runs started
    from, downloaded once into torch hub's cache (vit.download)."""
    if weights == "none":
        return None
    if weights != "auto":
        if not os.path.isfile(weights):
            raise UserError(
                f"--weights {weights}: {'a folder, not a file' if os.path.isdir(weights) else 'no such file'}"
            )
        return weights
    url = URLS[model_name]
    if not os.path.exists(vit.cached_file(url)):
        log(f"downloading {url}\n         to {vit.cached_file(url)}")
    try:
        return vit.download(url, progress=True)
    except vit.CheckpointError as e:
        raise UserError(f"--weights auto: {e}, or pass --weights PATH") from None


def load_weights(model, model_name, weights, path):
    """The published weights at `path` (None: keep the random init) into `model`."""
    try:
        if path:
            (vit if model_name.startswith("vit") else swin).load_pretrained(model, path)
    except vit.CheckpointError as e:
        advice = (
            "; --weights auto downloaded it: delete it, and the next run downloads it again"
            if weights == "auto"
            else ""
        )
        raise UserError(f"--weights {e}{advice}") from None


def check_weights(given, saved, what, needed=True):
    """A run continues, or is tested, with its own weights: --weights may say where they are now (the same
    file, so the same size), not name others. A file that has moved must be given anew when it is `needed`."""
    weights = given.get("weights", saved["weights"])
    if (
        needed
        and "weights" not in given
        and weights not in ("auto", "none")
        and not os.path.isfile(weights)
    ):
        raise UserError(
            f"{what} was trained from --weights {weights}, which is not there now: pass --weights with "
            f"where it is"
        )
    path = vit.cached_file(URLS[saved["model"]]) if weights == "auto" else weights
    size = 0 if weights == "none" else os.path.getsize(path) if os.path.isfile(path) else None
    if (
        weights in ("auto", "none")
        and weights == saved["weights"]
        or size is None
        and weights not in ("auto", "none")
    ):
        return  # the run's own choice; or a path that is not there, which weights_file reports when it is needed
    if size != saved["weights_bytes"]:
        describe = lambda name, n: f"{name} ({n:,} bytes)" if n else name
        raise UserError(
            f"{what}: --weights {describe(saved['weights'], saved['weights_bytes'])} there, "
            f"{describe(weights, size)} here; give the run's own weights"
        )
