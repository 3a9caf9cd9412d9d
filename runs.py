"""What a run needs around its training loop: its folder and files, weights files, resuming, stopping,
several processes, and suites of runs with their results tables. train.py's loop calls these; nothing
here trains.

    ctx = setup_distributed("cuda", workers=8)       # one process, or one of torchrun's
    check_out(out, fresh=True)                       # before hours of decoding: can the run be written there?
    save_checkpoint(run); restore_checkpoint(run, read_checkpoint(path, ctx.world))
    with StopFlag() as stop: ... if stop.is_set(ctx.control): raise Interrupted(stop.signum, epochs_done)

Every file is written atomically (a temporary file, then a rename), so an interruption or a full disk
never leaves half a file. A mistake in the command, the data or the files raises UserError: train.py
prints it as one line, without a traceback.
"""
import contextlib
import datetime
import inspect
import json
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
from torch.nn.parallel import DistributedDataParallel

import arc
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
# Options and data, checked before anything slow


def check_options(args, error):
    """Numbers in their ranges, a device this machine has, and options that go together; else error(message)."""
    for keys, ok, rule in ((("rank", "batch_size", "epochs", "img_size", "eval_every"), lambda v: v >= 1, "at least 1"),
                           (("warmup_epochs", "workers"), lambda v: v >= 0, "at least 0"),
                           (("lr", "weight_decay"), lambda v: 0 <= v <= 10, "a number from 0 to 10 (recipes: 0 to 0.05)"),
                           (("adapter_dropout", "vit_dropout", "drop_path"), lambda v: 0 <= v < 1, "a rate in [0, 1)")):
        for key in keys:
            if getattr(args, key) is not None and not ok(getattr(args, key)):  # `not ok`: nan fails every test
                error(f"{flag(key)} {getattr(args, key)} must be {rule}")
    try:
        device_type = torch.device(args.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        error(f"--device {args.device} is not a device this script runs on: cpu, cuda or cuda:N")
    if device_type == "cuda" and not torch.cuda.is_available():
        error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.eval_only != bool(args.checkpoint):
        error("--eval-only and --checkpoint go together: --eval-only --checkpoint runs/<run>/adapters.pth")
    if args.resume and args.out and os.path.abspath(args.out) not in (os.path.abspath(args.resume),
                                                                        os.path.dirname(os.path.abspath(args.resume))):
        error(f"--resume {args.resume} and --out {args.out} name different runs: give one of them")


def check_data(name, data_dir):
    """Whether the data is there is cheap to learn: before anything is downloaded or decoded."""
    absent = data.missing(name, data_dir)
    if absent:
        raise UserError(f"no {name} data: {absent} is missing (see --data-dir)")


# ---------------------------------------------------------------------------------------------------
# Processes


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


# Buffers (Swin's masks) are rebuilt alike by every process, so DDP need not sync them at each forward.
# torch 2.13 renamed the option.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})


def distributed(model, ctx):
    """The model as the loop calls it: itself, or wrapped in DDP under torchrun."""
    if ctx.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   **NO_BUFFER_SYNC)


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


# ---------------------------------------------------------------------------------------------------
# Around the loop: frozen weights in bf16, the loss, the pace, stop requests


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


def continue_with(saved, out, ctx):
    """How to go on after a stop: --resume when something was saved, else the same command again."""
    argv = [a for i, a in enumerate(sys.argv) if not (a.startswith("--resume") or sys.argv[i - 1] == "--resume")]
    launcher = f"torchrun --nproc_per_node={ctx.world}" if ctx.world > 1 else "python"
    if not saved:
        return f"No epoch had finished, so nothing is saved. Start again with:\n  {launcher} {shlex.join(argv)}"
    return (f"What had finished is saved in {out} (an epoch in progress starts again). Continue with:\n  "
            f"{launcher} {shlex.join(argv + ['--resume', out])}")


# ---------------------------------------------------------------------------------------------------
# Files: the output folder, atomic writes, checkpoints


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
        raise UserError(f"{option} {path} is unreadable: it is {vit.describe_file(path)}") from None
    if not isinstance(saved, dict) or not set(keys) <= saved.keys():
        raise UserError(f"{option} {path} is not {what} written by train.py")
    return saved


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


def save_checkpoint(run):
    """checkpoint.pth, then metrics.jsonl rewritten from the same history: killed between the two, the run
    resumes from the checkpoint and writes the log again, so every epoch has exactly one line."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(run.ctx.device) if run.ctx.device.type == "cuda" else None}
    states = [rng]
    if run.ctx.world > 1:  # every process's random state (its dropout), gathered: a collective
        states = [None] * run.ctx.world
        dist.all_gather_object(states, rng, group=run.ctx.control)
    if run.ctx.rank == 0:
        save_atomic({"config": vars(run.cfg), "trained": trained_tensors(run.model), "rng": states,
                     "optimizer": run.optimizer.state_dict(), "history": run.history},
                    os.path.join(run.out, "checkpoint.pth"))
        save_atomic("".join(json.dumps(m) + "\n" for m in run.history), os.path.join(run.out, "metrics.jsonl"))


def restore_checkpoint(run, checkpoint):
    load_trained_tensors(run.model, checkpoint["trained"], os.path.join(run.out, "checkpoint.pth"))
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"][run.ctx.rank]
    torch.set_rng_state(rng["cpu"])
    if run.ctx.device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.ctx.device)
    run.history = checkpoint["history"]
    if checkpoint["config"]["epochs"] != run.cfg.epochs:
        run.history[-1]["schedule"] = f"then extended from {checkpoint['config']['epochs']} to {run.cfg.epochs} epochs"
        run.ctx.log(f"extending the run: the cosine schedule is recomputed for {run.cfg.epochs} epochs")
    run.ctx.log(f"resuming {run.out} after epoch {len(run.history)}")


# ---------------------------------------------------------------------------------------------------
# Resuming: the run --resume names, and what may change


def run_folder(path):
    """The run (or suite) folder that --resume names: the folder itself, or the folder of a file in it (a
    mistyped folder stays itself, so that it is the one reported missing)."""
    return os.path.dirname(path) if os.path.isfile(path) or path.endswith(".pth") else path


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


def finished(out):
    """The record of the finished run in `out` (its adapters.pth config, written last), or None."""
    if not all(os.path.exists(os.path.join(out, name)) for name in ("adapters.pth", "folded.pth")):
        return None
    return read_saved(os.path.join(out, "adapters.pth"), "--resume", ("config",), "an adapters.pth")["config"]


# Options that say where a run's files are now, or how often to test, may differ on --resume; --epochs may grow.
MAY_CHANGE = ("data_dir", "eval_every", "epochs", "weights")


def check_resume(given, saved, done, out):
    """A run continues with its own settings. The command line may say where its files are now, how often to
    test, and --epochs, which may grow: the schedule is then recomputed for the new length."""
    changed = [key for key in given if key not in MAY_CHANGE and given[key] != saved[key]
               and not (key == "data" and data.is_path(given[key]) and data.is_path(saved[key]))]
    if changed:
        raise UserError(f"--resume {out} comes from another run: " + ", ".join(
            f"{flag(key)} {saved[key]} there, {given[key]} here" for key in changed)
            + "; give the same options, or start a new run with another --out")
    if given.get("epochs", saved["epochs"]) < saved["epochs"]:
        raise UserError(f"--resume {out} is a run of {saved['epochs']} epochs ({done} done): --epochs "
                        f"{given['epochs']} would shorten it; a run can only be extended")


def check_classes(classes, task, source):
    if classes != task.classes:
        raise UserError(f"{source} was trained on {len(classes)} classes {classes[:5]}, "
                        f"the data has {task.num_classes} {task.classes[:5]}")


# ---------------------------------------------------------------------------------------------------
# Weights files


def auto_weights(model_name):
    """(URL, path in torch hub's cache) of the published checkpoint the official runs started from."""
    url = {**vit.URLS, **swin.URLS}[model_name]
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def weights_file(weights, model_name):
    """The file --weights names (None for 'none'); 'auto' downloads the published checkpoint once into
    torch hub's cache."""
    if weights == "none":
        return None
    if weights != "auto":
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: {'a folder, not a file' if os.path.isdir(weights) else 'no such file'}")
        return weights
    url, path = auto_weights(model_name)
    if not os.path.exists(path):
        try:  # can the cache be written? Then whatever goes wrong below is the download's fault
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.rmdir(tempfile.mkdtemp(dir=os.path.dirname(path)))
        except OSError as e:
            raise UserError(f"--weights auto: cannot write torch hub's cache {os.path.dirname(path)} ({e.strerror}): "
                            f"set TORCH_HOME to a folder you can write, or download {url} and pass --weights PATH") from None
        print(f"downloading {url}\n         to {path}")
        try:
            torch.hub.download_url_to_file(url, path, progress=True)  # writes a temporary file, then renames
        except Exception as e:
            raise UserError(f"could not download the {model_name} weights ({type(e).__name__}: {e}). Looked for "
                            f"{path}: download {url} by hand and put it there, or pass --weights PATH") from None
    return path


def load_weights(model, model_name, weights, path):
    """The published weights at `path` (None: keep the random init) into `model`."""
    try:
        if path:
            (vit if model_name.startswith("vit") else swin).load_pretrained(model, path)
    except vit.CheckpointError as e:
        advice = ("; --weights auto downloaded it: delete it, and the next run downloads it again"
                  if weights == "auto" else "")
        raise UserError(f"--weights {e}{advice}") from None


def check_weights(given, saved, what, needed=True):
    """A run continues, or is tested, with its own weights: --weights may say where they are now (the same
    file, so the same size), not name others. A file that has moved must be given anew when it is `needed`."""
    weights = given.get("weights", saved["weights"])
    if needed and "weights" not in given and weights not in ("auto", "none") and not os.path.isfile(weights):
        raise UserError(f"{what} was trained from --weights {weights}, which is not there now: pass --weights with "
                        f"where it is")
    path = auto_weights(saved["model"])[1] if weights == "auto" else weights
    size = 0 if weights == "none" else os.path.getsize(path) if os.path.isfile(path) else None
    if weights in ("auto", "none") and weights == saved["weights"] or size is None and weights not in ("auto", "none"):
        return  # the run's own choice; or a path that is not there, which weights_file reports when it is needed
    if size != saved["weights_bytes"]:
        describe = lambda name, n: f"{name} ({n:,} bytes)" if n else name
        raise UserError(f"{what}: --weights {describe(saved['weights'], saved['weights_bytes'])} there, "
                        f"{describe(weights, size)} here; give the run's own weights")


# ---------------------------------------------------------------------------------------------------
# Suites: a folder per task, and the paper's tables


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


def plan_suite(given, out, ctx, resume, default_data_dir):
    """[(folder, options, the folder to resume or None)] of each task of a suite started or resumed in `out`,
    once its data and folder are checked. suite.json keeps the options the suite started with; a started task
    keeps its own."""
    suite_file = os.path.join(out, "suite.json")
    stored = read_suite(suite_file, out) if resume else {}
    if resume and given.get("data", stored["data"]) != stored["data"]:
        raise UserError(f"--resume {out} is the suite --data {stored['data']}, not --data {given['data']}")
    tasks = suite_tasks(given.get("data") or stored["data"])
    options = {"data_dir": default_data_dir, **stored, **given}
    plan = {}
    for task in tasks:
        folder = os.path.join(out, os.path.basename(os.path.normpath(task)))
        started = os.path.exists(os.path.join(folder, "checkpoint.pth"))
        plan[task] = (folder, {**({"data_dir": options["data_dir"], **given} if started else options), "data": task},
                      folder if started else None)
    missing = {task: data.missing(task, options["data_dir"]) for task in tasks if not finished(plan[task][0])}
    if any(missing.values()):
        raise UserError(f"no data for {sum(map(bool, missing.values()))} of the {len(tasks)} tasks: " + ", ".join(
            f"{task} ({absent} is missing)" for task, absent in missing.items() if absent) + ". Put it there, or run the "
            f"others: --data {','.join(task for task in tasks if not missing.get(task))}")
    check_out(out, fresh=not resume)
    if ctx.control is not None:
        dist.barrier(group=ctx.control)  # every process has checked `out` before the first one writes to it
    if ctx.rank == 0 and not resume:
        os.makedirs(out, exist_ok=True)
        save_atomic(json.dumps(options, indent=1), suite_file)
    return list(plan.values())


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
