"""Speed and memory of ARC, measured in one run on one machine: tables, a whole run, or a GPU check's report.

    python bench.py                        # a small ViT on the CPU (vit_t16, 64 px): a minute
    python bench.py --model vit_b16 --img-size 224 --batch-size 32   # the paper's setting (a GPU)
    python bench.py --run dtd              # a whole VTAB-1k DTD run, timed (ViT-B/16, 224 px, 100 epochs)
    python bench.py --run dtd --epochs 1 --model vit_t16 --img-size 32   # the same path, short, on a CPU
    python bench.py --report gpu_report.md # the CUDA tests and every figure below, as markdown (.ci/gpu runs it)

Training: images/s of train.py's own step (forward, backward, clip, AdamW on the trainable tensors; bf16 autocast
on CUDA) for arc, arc_att, linear and full, and on CUDA the peak memory of each. Inference: images/s of the plain
model, ARC unfolded, and ARC folded by arc.reparameterize. The variants are timed in turn, round after round, and
the median is reported, so that a machine whose speed drifts (a shared CPU, a GPU warming up) slows them all alike.
--run dtd: train.py's own run (train.run_task) on images of DTD's shape under VTAB-1k (1,000 training and 1,880 test
images, 47 classes, written as an image folder first), with the default recipe, from start-up (decoding included) to
folded.pth, and the wall time split into start-up, training, testing and finish.
--report PATH: REPORT_SECTIONS (--sections picks some) in one markdown file, rewritten after each: the CUDA tests,
the tables above, the DTD run, Swin-B, timm + peft LoRA, FLOPs against time (launch-bound?), torch.compile.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import arc
import data
import paper
import runs
import train
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("arc", "arc_att", "linear", "full")
H200_BF16_FLOPS = (
    790e12  # an 8192^3 bf16 matrix product on an H200, random data: the step's arithmetic ceiling
)
TESTS_TIMEOUT_S, DTD_TRAIN_IMAGES = (
    300,
    1000,
)  # the CUDA tests' time limit; VTAB-1k DTD's training images


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls, device, warmup, rounds):
    """{name: median seconds per call}, calling each in turn every round."""
    seconds = {name: [] for name in calls}
    for round in range(warmup + rounds):
        for name, call in calls.items():
            sync(device)  # the device timed (--device cuda:1), not the current one
            start = time.perf_counter()
            call()
            sync(device)
            if round >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def changed(args, **settings):
    return argparse.Namespace(**{**vars(args), **settings})


def build(args, method):
    """args.model with random weights, as train.py prepares it for `method`, with its recipe's dropouts."""
    torch.manual_seed(0)
    cfg = SimpleNamespace(
        **{
            **paper.DEFAULTS,
            **paper.recipe("dtd", args.model)[1],
            "model": args.model,
            "img_size": args.img_size,
            "method": method,
            "weights": "none",
        }
    )
    return train.prepare_model(cfg, 47, None, log=print)


def random_batch(args, device):
    images = torch.randint(
        0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device
    )
    return images, torch.randint(0, 47, (args.batch_size,), device=device)


def stepper(model, args, device):
    """A closure running one train.py step of `model` on a fixed batch; .trainable counts what it trains."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    images, labels = random_batch(args, device)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def step():  # train.py's step, as its loop runs it
        with train.autocast(device, precision):
            loss = F.cross_entropy(model(data.normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    step.trainable = sum(p.numel() for p in params)
    return step


def training_step(args, device, method, stack):
    """A step of `method`, the frozen weights in bf16 on CUDA as train.py keeps them (until `stack` closes)."""
    model = build(args, method).to(device).train()
    stack.enter_context(train.frozen_in_bf16(model, device.type == "cuda"))
    return stepper(model, args, device)


def inference(args, device, model):
    model.to(device).eval()
    images, _ = random_batch(args, device)

    def forward():
        with torch.no_grad(), train.autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            model(data.normalize(images))

    return forward


def peak_memory(device, make):
    """GiB at the peak of two steps of make(stack)'s step, model and optimizer state included (None on a CPU)."""
    if device.type != "cuda":
        return None
    gc.collect(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats(device)
    with contextlib.ExitStack() as stack:
        step = make(stack)
        step(), step()
        sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def training_speeds(args, device):
    """{method: (seconds a step, peak GiB or None)} for METHODS."""
    memory = {
        m: peak_memory(device, lambda stack, m=m: training_step(args, device, m, stack))
        for m in METHODS
    }
    with contextlib.ExitStack() as stack:
        steps = {m: training_step(args, device, m, stack) for m in METHODS}
        speed = interleaved(steps, device, args.warmup, args.rounds)
    return {m: (speed[m], memory[m]) for m in METHODS}


def inference_speeds(args, device):
    """{plain, arc unfolded, arc folded: seconds a batch}."""
    unfolded = build(args, "arc")
    models = {
        "plain": build(args, "linear"),
        "arc unfolded": unfolded,
        "arc folded": arc.reparameterize(copy.deepcopy(unfolded)),
    }
    return interleaved(
        {name: inference(args, device, model) for name, model in models.items()},
        device,
        args.warmup,
        args.rounds,
    )


def write_dtd_shaped(root, img_size, seed=0):
    """An image folder shaped as VTAB-1k DTD: 1,000 train and 1,880 test PNGs of 47 classes, random pixels."""
    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", DTD_TRAIN_IMAGES), ("test", 1880)):
        pixels = torch.randint(
            0, 256, (count, img_size, img_size, 3), dtype=torch.uint8, generator=generator
        )
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % 47:02d}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[i].numpy()).save(
                os.path.join(folder, f"{i:04d}.png"), compress_level=1
            )
    return root


DTD_PARTS = (
    ("setup", "start-up: model, data decoded to the device"),
    ("training", "training"),
    ("testing", "testing: every 10 epochs and after the last"),
    ("finish", "finish: adapters.pth, folding, folded.pth"),
)


def time_dtd_run(args):
    """train.run_task on images shaped as VTAB-1k DTD: its result, and its wall time from start-up to folded.pth."""
    with tempfile.TemporaryDirectory() as scratch:
        given = {
            "data": write_dtd_shaped(os.path.join(scratch, "dtd_shaped"), args.img_size),
            "model": args.model,
            "img_size": args.img_size,
            "weights": "none",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
        }
        ctx = train.setup_distributed(args.device, workers=min(8, data.CORES))
        started = time.time()
        result = train.run_task(given, os.path.join(scratch, "run"), ctx)
        return result, time.time() - started


def machine(device):
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    )
    return f"{where}, {torch.get_num_threads()} CPU threads; torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------
# --report: sections of markdown, each a function of (args, device); one that fails starts with **FAILED**


def table(header, rows):
    cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")
    return "\n".join(
        "| " + " | ".join(map(cell, row)) + " |" for row in [header, ["---"] * len(header), *rows]
    )


def gib(value):
    return "-" if value is None else f"{value:.2f}"


def run_command(command, timeout):
    """(exit status, or None when it ran past `timeout` and was stopped with its children; its output)."""
    process = subprocess.Popen(
        command,
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            output = process.communicate(timeout=timeout)[0]
            return process.returncode, output
    finally:  # done, past its time, or bench.py stopped: whatever is left of its group (pytest; torchrun, workers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        return None, process.communicate(timeout=10)[0]
    return None, "(no output: a child still holds the pipe)"


def tests_section(args, device):
    """The CUDA tests in another process; each one's result from pytest's junit xml, and a failure's message tail."""
    with tempfile.TemporaryDirectory() as scratch:
        junit = os.path.join(scratch, "junit.xml")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-rs",
            "-q",
            "-k",
            "test_cuda_",
            "test_arc.py",
            f"--junitxml={junit}",
        ]
        status, output = run_command(command, TESTS_TIMEOUT_S)
        cases = (
            list(ElementTree.parse(junit).getroot().iter("testcase"))
            if os.path.exists(junit)
            else []
        )
    rows, failures = [], []
    for case in cases:
        outcome = next(
            (child for child in case if child.tag in ("failure", "error", "skipped")), None
        )
        result = (
            "passed"
            if outcome is None
            else {"failure": "FAILED", "error": "ERROR"}.get(outcome.tag, "skipped")
        )
        message = "" if outcome is None else outcome.get("message", "")
        rows.append([case.get("name"), result, f"{float(case.get('time', 0)):.1f}", message[:200]])
        if result in ("FAILED", "ERROR"):
            failures.append(
                f"`{case.get('name')}`:\n\n```\n{(outcome.text or message)[-1500:]}\n```"
            )
    lines = [line for line in output.splitlines() if line.strip()]
    summary = (
        f"stopped after {TESTS_TIMEOUT_S} s"
        if status is None
        else lines[-1]
        if lines
        else "no output"
    )
    tail = [f"output tail:\n\n```\n{output[-3000:]}\n```"] * (status is None or not rows)
    body = "\n\n".join(
        [
            f"`python {' '.join(command[1:-1])}`: **{summary}**",
            table(["test", "result", "s", "message"], rows),
            *failures,
            *tail,
        ]
    )
    return body if status == 0 else f"**FAILED**: {body}"


def steps_section(args, device):
    training, inferring = training_speeds(args, device), inference_speeds(args, device)
    return "\n\n".join(
        [
            f"{args.model}, {args.img_size} px, batch {args.batch_size}; train.py's step (frozen weights in bf16 on CUDA)",
            table(
                ["training", "images/s", "ms a step", "vs full", "peak GiB"],
                [
                    [
                        m,
                        f"{args.batch_size / s:.1f}",
                        f"{1000 * s:.1f}",
                        f"{training['full'][0] / s:.2f}x",
                        gib(memory),
                    ]
                    for m, (s, memory) in training.items()
                ],
            ),
            table(
                ["inference", "images/s", "time vs plain"],
                [
                    [m, f"{args.batch_size / s:.1f}", f"{s / inferring['plain']:.3f}"]
                    for m, s in inferring.items()
                ],
            ),
        ]
    )


def dtd_markdown(args, result, wall):
    seconds, steps = result["seconds"], args.epochs * math.ceil(DTD_TRAIN_IMAGES / args.batch_size)
    rows = [[what, f"{seconds[part]:.1f}"] for part, what in DTD_PARTS] + [
        ["**wall time**", f"**{wall:.1f}**"]
    ]
    rows[1][0] += (
        f": {DTD_TRAIN_IMAGES * args.epochs / seconds['training']:.0f} images/s, "
        f"{1000 * seconds['training'] / steps:.1f} ms a step over {steps} steps"
    )
    verdict = (
        "(the goal is for vit_b16, 224 px, batch 32, 100 epochs)"
        if (args.model, args.img_size, args.batch_size, args.epochs) != ("vit_b16", 224, 32, 100)
        else "meets the goal (at most 30 s)"
        if wall <= 30
        else "is within the limit (60 s), over the goal (30 s)"
        if wall <= 60
        else "is OVER the limit (60 s)"
    )
    return "\n\n".join(
        [
            f"`train.run_task`, {args.model}, {args.img_size} px, batch {args.batch_size}, {args.epochs} "
            f"epoch(s), the default recipe; final accuracy {result['final']:.2f}% (random pixels)",
            table(["part", "s"], rows),
            f"the wall time {verdict}",
        ]
    )


def swin_section(args, device):
    make = lambda stack: training_step(changed(args, model="swin_b"), device, "arc", stack)
    memory = peak_memory(device, make)
    with contextlib.ExitStack() as stack:
        seconds = interleaved({"swin": make(stack)}, device, args.warmup, args.rounds)["swin"]
    return (
        f"swin_b ARC step (its recipe: adapter dropout 0.5, drop-path 0.1), {args.img_size} px, batch "
        f"{args.batch_size}: **{args.batch_size / seconds:.1f} images/s** ({1000 * seconds:.1f} ms a step), "
        f"peak {gib(memory)} GiB"
    )


TIMM_SIZES = {
    "t": "tiny",
    "s": "small",
    "b": "base",
    "l": "large",
    "h": "huge",
}  # vit_b16: vit_base_patch16_224
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["qkv"], modules_to_save=["head"])


def lora_step(args, device, stack, frozen_bf16):
    """timm's ViT of args.model's size with peft's LoRA (LORA) on qkv and a trained head, stepped by train.py's step."""
    import peft  # neither is a dependency of this project: only this comparison uses them
    import timm

    torch.manual_seed(0)
    name = f"vit_{TIMM_SIZES[args.model[4]]}_patch{args.model[5:]}_224"
    model = timm.create_model(name, pretrained=False, num_classes=47, img_size=args.img_size)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA)).to(device).train()
    stack.enter_context(train.frozen_in_bf16(model, frozen_bf16 and device.type == "cuda"))
    return stepper(model, args, device)


def peft_section(args, device):
    missing = [name for name in ("timm", "peft") if importlib.util.find_spec(name) is None]
    if missing or not args.model.startswith("vit"):
        return f"not measured: {' and '.join(missing) + ' missing here' if missing else 'timm + peft for ViTs only'}"
    makers = {
        "ARC (ours, vit.py)": lambda stack: training_step(args, device, "arc", stack),
        "LoRA, frozen weights float32 (peft as usually run)": lambda stack: lora_step(
            args, device, stack, False
        ),
        "LoRA, frozen weights in bf16 (train.frozen_in_bf16)": lambda stack: lora_step(
            args, device, stack, True
        ),
    }
    memory = {name: peak_memory(device, make) for name, make in makers.items()}
    with contextlib.ExitStack() as stack:
        steps = {name: make(stack) for name, make in makers.items()}
        speed = interleaved(steps, device, args.warmup, args.rounds)
    rows = [
        [
            name,
            f"{steps[name].trainable:,}",
            f"{args.batch_size / s:.1f}",
            f"{1000 * s:.1f}",
            f"{s / speed['ARC (ours, vit.py)']:.2f}x",
            gib(memory[name]),
        ]
        for name, s in speed.items()
    ]
    return "\n\n".join(
        [
            f"timm {importlib.metadata.version('timm')} `vit_{TIMM_SIZES[args.model[4]]}_patch{args.model[5:]}_224` + peft "
            f"{importlib.metadata.version('peft')} LoRA r={LORA['r']}, alpha={LORA['lora_alpha']}, dropout "
            f"{LORA['lora_dropout']} (peft's defaults: r 8, alpha 8, dropout 0) on `qkv`, head trained (modules_to_save); "
            f"train.py's step ({'bf16 autocast, ' * (device.type == 'cuda')}clip, AdamW); random weights",
            table(
                [
                    "step",
                    "trainable",
                    "images/s",
                    "ms a step",
                    "ARC's images/s over its",
                    "peak GiB",
                ],
                rows,
            ),
        ]
    )


def vit_flops(model_name, img_size):
    """Forward FLOPs an image of a ViT (2 a multiply-add): every token through qkv, proj, fc1 and fc2, attention
    (2 N^2 d a layer), the patch embedding. ARC's adapters and the head add under 2%: left out."""
    patch, dim, depth, _, mlp = vit.CONFIGS[model_name]
    tokens = (img_size // patch) ** 2 + 1
    return 2 * (
        depth * (tokens * (4 * dim * dim + 2 * dim * mlp) + 2 * tokens * tokens * dim)
        + (tokens - 1) * 3 * patch * patch * dim
    )


def launch_section(args, device):
    """The ARC step's time against its FLOPs at an H200's bf16 rate; the host's time to issue it; batch x4."""
    bigger, issue, counter = (
        changed(args, batch_size=4 * args.batch_size),
        [],
        FlopCounterMode(display=False),
    )
    with contextlib.ExitStack() as stack:
        step = training_step(args, device, "arc", stack)
        with counter:
            step()
        seconds = interleaved({"step": step}, device, args.warmup, args.rounds)["step"]
        for _ in range(args.rounds):  # the GPU idle before; the step has no sync inside
            sync(device)
            started = time.perf_counter()
            step()
            issue.append(time.perf_counter() - started)
    with contextlib.ExitStack() as stack:
        big = interleaved(
            {"big": training_step(bigger, device, "arc", stack)}, device, args.warmup, args.rounds
        )["big"]
    forward = vit_flops(args.model, args.img_size) if args.model in vit.CONFIGS else 0
    counted, issue, scaling = counter.get_total_flops(), statistics.median(issue), 4 * seconds / big
    flops = max(counted, 2 * forward * args.batch_size)
    rows = [
        [
            "counted by torch.utils.flop_counter (matmuls, convolutions; attention where registered)",
            f"{counted / 1e9:,.1f} GFLOPs",
        ],
        [
            f"estimated: 2 x forward (the frozen weights get no gradients, their inputs do) x {args.batch_size} "
            f"images; forward {forward / 1e9:.1f} GFLOPs an image (ViT-B/16 at 224: 17.6 G multiply-adds, 35.1 "
            f"GFLOPs)",
            f"{2 * forward * args.batch_size / 1e9:,.1f} GFLOPs",
        ],
        [
            "the larger at 790 TFLOP/s (an H200's bf16 matrix rate)",
            f"{1000 * flops / H200_BF16_FLOPS:.2f} ms",
        ],
        [
            "measured step",
            f"{1000 * seconds:.2f} ms: {100 * flops / H200_BF16_FLOPS / seconds:.1f}% of that rate",
        ],
        [
            "host time to issue one step",
            f"{1000 * issue:.2f} ms: {100 * issue / seconds:.0f}% of the step",
        ],
        [
            f"images/s at batch {bigger.batch_size} over images/s at batch {args.batch_size}",
            f"{scaling:.2f}x",
        ],
    ]
    verdict = (
        "not meaningful on a CPU"
        if device.type != "cuda"
        else "launch-bound: the GPU mostly waits for Python to issue kernels"
        if issue > 0.8 * seconds or scaling > 2
        else "partly overhead-bound: a bigger batch still pays"
        if scaling > 1.3
        else "GPU-bound"
    )
    return "\n\n".join(
        [
            f"ARC step, {args.model}, {args.img_size} px, batch {args.batch_size}",
            table(["FLOPs a step", ""], rows),
            f"verdict: **{verdict}**",
        ]
    )


def compile_section(args, device):
    """torch.compile of the model in the ARC step: compile times, steady speed, the net over the DTD run's steps."""
    torch._dynamo.reset()
    model, first = build(args, "arc").to(device).train(), []
    try:
        with train.frozen_in_bf16(model, device.type == "cuda"):
            eager, compiled = (
                stepper(model, args, device),
                stepper(torch.compile(model), args, device),
            )
            for call in (
                compiled,
                lambda: inference(args, device, torch.compile(model))(),
            ):  # eval: another graph
                sync(device)
                started = time.perf_counter()
                call()
                sync(device)
                first.append(time.perf_counter() - started)
            model.train()
            speed = interleaved(
                {"eager": eager, "compiled": compiled}, device, args.warmup, args.rounds
            )
    finally:
        torch._dynamo.reset()
    compile_s, steps = (
        first[0] - speed["compiled"],
        args.epochs * math.ceil(DTD_TRAIN_IMAGES / args.batch_size),
    )
    saved, cost = steps * (speed["eager"] - speed["compiled"]), 2 * (compile_s + first[1])
    rows = [
        [
            "first compiled step, less a steady one: compiling forward and backward",
            f"{compile_s:.1f}",
        ],
        ["first compiled evaluation (eval mode, no grad: another graph)", f"{first[1]:.1f}"],
        [f"saved over the DTD run's {steps} steps ({args.epochs} epochs)", f"{saved:.1f}"],
        [
            "compiling in that run: twice the two above (its last, smaller batches compile again)",
            f"{cost:.1f}",
        ],
        ["**net win over the run** (negative: a loss)", f"**{saved - cost:.1f}**"],
    ]
    return "\n\n".join(
        [
            f"`torch.compile(model)` (default mode) in train.py's ARC step, {args.model}, {args.img_size} "
            f"px, batch {args.batch_size}; AdamW stays eager",
            table(
                ["step", "images/s", "ms a step"],
                [[n, f"{args.batch_size / s:.1f}", f"{1000 * s:.2f}"] for n, s in speed.items()],
            ),
            table(["", "s"], rows),
        ]
    )


REPORT_SECTIONS = {  # --sections key: (title, a function of (args, device) that returns the section's markdown)
    "tests": ("CUDA tests", tests_section),
    "steps": ("Training and inference steps", steps_section),
    "dtd": (
        "The whole DTD-shaped run",
        lambda args, device: dtd_markdown(args, *time_dtd_run(args)),
    ),
    "swin": ("Swin-B ARC step", swin_section),
    "peft": ("timm + peft LoRA against ARC", peft_section),
    "launch": ("Is the step launch-bound?", launch_section),
    "compile": ("torch.compile trial", compile_section),
}


def report(args, device, argv):
    """args.sections into the markdown file args.report, rewritten after each (a run cut short leaves what it
    measured). Returns the titles of the sections that failed."""
    cuda, chosen, started, failed = device.type == "cuda", args.sections.split(","), time.time(), []
    gpu = torch.cuda.get_device_name(device) if cuda else "a CPU"
    facts = {
        "machine": platform.node(),
        "CPU": f"{data.CORES} cores to use of {os.cpu_count()}, {platform.machine()}",
        "GPU": f"{gpu}, {torch.cuda.mem_get_info(device)[1] / 2**30:.0f} GiB"
        if cuda
        else "none (CPU)",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "CUDA": torch.version.cuda,
        "cuDNN": torch.backends.cudnn.version(),
        "Python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
        "command": " ".join(["python bench.py", *argv]),
        "setting": f"{args.model}, {args.img_size} px, batch "
        f"{args.batch_size}, {'bf16 autocast' if cuda else 'float32'}, median of {args.rounds} rounds",
    }
    parts = [
        f"# ARC: CUDA tests and speed on {gpu}",
        table(["", ""], facts.items()),
        "not run (--sections): "
        + (
            ", ".join(title for key, (title, _) in REPORT_SECTIONS.items() if key not in chosen)
            or "none"
        ),
    ]
    save = lambda *more: runs.save_atomic("\n\n".join([*parts, *more]) + "\n", args.report)
    signal.signal(
        signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)
    )  # .ci/gpu's limit: stop, see below
    for title, measure in (REPORT_SECTIONS[key] for key in chosen):
        print(f"bench.py --report: {title}", flush=True)
        section_started = time.time()
        try:
            body = measure(args, device)
        except (
            KeyboardInterrupt,
            SystemExit,
            train.Stopped,
        ) as stop:  # .ci/gpu's time limit, or a Ctrl-C
            code = (
                getattr(stop, "exit_code", None)
                or getattr(stop, "code", None)
                or 128 + signal.SIGINT
            )
            save(f"stopped in: {title} (exit status {code})")
            raise SystemExit(code) from None
        except Exception:
            body = f"**FAILED**:\n\n```\n{traceback.format_exc()[-3000:]}\n```"
        failed += [title] * body.startswith("**FAILED**")
        parts.append(
            f"## {title}\n\n{body}\n\n_section time: {time.time() - section_started:.0f} s_"
        )
        save()
    save(f"total: {time.time() - started:.0f} s; failed: {', '.join(failed) or 'none'}")
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", choices=["dtd"], help="time a whole run instead of single steps")
    p.add_argument("--report", metavar="PATH", help="write the GPU check's markdown report there")
    p.add_argument(
        "--sections", default=",".join(REPORT_SECTIONS), help="for --report, in this order"
    )
    p.add_argument("--epochs", type=int, default=100, help="for --run and --report")
    p.add_argument(
        "--model",
        choices=sorted(train.MODELS),
        help="default: vit_t16, or vit_b16 for --run, --report",
    )
    p.add_argument("--img-size", type=int, help="default: 64, or 224 for --run, --report")
    for flag, default in (("--batch-size", 32), ("--warmup", 2), ("--rounds", 7)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(REPORT_SECTIONS)
    if unknown:
        p.error(
            f"--sections: unknown {', '.join(sorted(unknown))}; choose from {','.join(REPORT_SECTIONS)}"
        )
    args.model = args.model or ("vit_b16" if args.run or args.report else "vit_t16")
    args.img_size = args.img_size or (224 if args.run or args.report else 64)
    device = torch.device(args.device)
    if args.report:
        return report(args, device, argv)
    if args.run:  # the wall time split; returns the run's result
        result, wall = time_dtd_run(args)
        print(f"\nDTD-shaped run on {machine(device)}:\n\n{dtd_markdown(args, result, wall)}")
        return result
    print(
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, median of {args.rounds} rounds on "
        f"{machine(device)}:\n\n{steps_section(args, device)}"
    )


if __name__ == "__main__":
    result = main()
    sys.exit(1 if isinstance(result, list) and result else 0)  # --report: the sections that failed
