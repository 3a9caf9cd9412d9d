"""Speed of ARC: the training step and inference, float32 against bf16 autocast, on a CPU or a GPU.

    python bench.py                          # vit_t16 at 64 px: a minute or two on a CPU
    python bench.py --model vit_b16 --img-size 224 --batch-size 32   # the paper's setting (a GPU)
    python bench.py --dtd-run --model vit_b16 --img-size 224         # a whole train.py run, timed

The training step is the one train.py takes, written out here: forward, cross-entropy, backward,
clipping the gradient norm to 1, AdamW on what the method trains. It is timed for ARC, ARC on the
attention side only, a linear probe (the head alone) and full fine-tuning; on CUDA also with the
extra memory each step takes at its peak (activations, gradients, AdamW's state, not the weights).
With timm and peft installed (neither is a dependency of this project), timm's ViT of the same size
with peft's LoRA on qkv is timed too. Inference times the plain model, ARC unfolded, and ARC folded
by arc.reparameterize.

Each is timed in float32 and under bf16 autocast. On a CPU, bf16 is timed only where the CPU
computes it natively (oneDNN says so: AVX512-BF16 or AMX); elsewhere it is emulated and slow. The
frozen weights stay float32 on every device, and autocast casts them layer by layer.

Every variant runs in turn, round after round, and the median is reported, so that a machine whose
speed drifts (a shared CPU, a GPU warming up) slows them all alike.

--dtd-run writes images of VTAB-1k DTD's shape (1,000 training and 1,880 test images of 47 classes,
random pixels) as an image folder, runs `python train.py` on it with the default recipe, and
reports its wall time, from start-up to folded.pth.
"""

import argparse
import copy
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from PIL import Image

import arc
import data
import swin
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {name: getattr(module, name) for module in (vit, swin) for name in module.CONFIGS}
METHODS = ("arc", "arc_att", "linear", "full")
CLASSES = 47  # DTD's
DTD_SPLITS = {"train": 1000, "test": 1880}


def native_bf16(device):
    """Whether `device` computes bf16 itself rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls, device, warmup, rounds):
    """The median seconds of each call, calling each in turn every round after `warmup` rounds."""
    seconds = {name: [] for name in calls}
    for round_number in range(warmup + rounds):
        for name, call in calls.items():
            sync(device)  # the device timed (say cuda:1), not the current one
            start = time.perf_counter()
            call()
            sync(device)
            if round_number >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def build(model_name, img_size, method):
    """A model with random weights, only what `method` trains left trainable (LoRA: timm + peft)."""
    torch.manual_seed(0)
    if method == "lora":
        import peft  # neither is a dependency: only this comparison uses them
        import timm

        size = {"t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}[model_name[4]]
        timm_name = f"vit_{size}_patch{model_name[5:]}_224"
        model = timm.create_model(timm_name, num_classes=CLASSES, img_size=img_size)
        lora = peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["qkv"], modules_to_save=["head"]
        )
        return peft.get_peft_model(model, lora)
    adapters = method if method in ("arc", "arc_att") else None
    model = MODELS[model_name](num_classes=CLASSES, img_size=img_size, arc=adapters)
    if adapters:
        arc.mark_trainable(model)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(method == "full" or name.startswith("head."))
    return model


def autocast(device, precision):
    """bf16 autocast for "bf16"; for "fp32", nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def training_step(model, images, labels, precision):
    """One step as train.py takes it, in `precision`. The step returns its loss as a device
    tensor, so that timing it adds no host sync."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=images.is_cuda)

    def step():
        with autocast(images.device, precision):
            loss = F.cross_entropy(model(data.normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    return step


def inference(model, images, precision):
    @torch.no_grad()
    def forward():
        with autocast(images.device, precision):
            model(data.normalize(images))

    return forward


def extra_memory(step, device):
    """GiB that two steps take at their peak beyond what was allocated before; None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def speed_header(precisions):
    header = [f"{precision} images/s" for precision in precisions]
    if len(precisions) == 2:
        header.append("bf16 speed-up")
    return header


def speed_cells(seconds, batch_size):
    """Images/s in each precision timed, and bf16's speed-up over float32 when both were timed."""
    cells = [f"{batch_size / s:.1f}" for s in seconds]
    if len(seconds) == 2:
        cells.append(f"{seconds[0] / seconds[1]:.2f}x")
    return cells


def training_table(args, device, methods, precisions, images, labels):
    models = {method: build(args.model, args.img_size, method).to(device) for method in methods}
    steps = {
        (method, precision): training_step(model.train(), images, labels, precision)
        for method, model in models.items()
        for precision in precisions
    }
    memory = {key: extra_memory(step, device) for key, step in steps.items()}
    seconds = interleaved(steps, device, args.warmup, args.rounds)
    header = ["training", "trainable", *speed_header(precisions)]
    if device.type == "cuda":
        header += [f"{precision} extra GiB" for precision in precisions]
    rows = []
    for method, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cells = [method, f"{trainable:,}"]
        cells += speed_cells([seconds[method, p] for p in precisions], args.batch_size)
        if device.type == "cuda":
            cells += [f"{memory[method, p]:.2f}" for p in precisions]
        rows.append(cells)
    return table(header, rows)


def inference_table(args, device, precisions, images):
    unfolded = build(args.model, args.img_size, "arc")
    models = {
        "plain": build(args.model, args.img_size, "linear"),
        "arc unfolded": unfolded,
        "arc folded": arc.reparameterize(copy.deepcopy(unfolded)),
    }
    calls = {
        (name, precision): inference(model.to(device).eval(), images, precision)
        for name, model in models.items()
        for precision in precisions
    }
    seconds = interleaved(calls, device, args.warmup, args.rounds)
    rows = [
        [name, *speed_cells([seconds[name, p] for p in precisions], args.batch_size)]
        for name in models
    ]
    return table(["inference", *speed_header(precisions)], rows)


def write_dtd_shaped(root, img_size):
    """An image folder of VTAB-1k DTD's shape, random pixels: root/{train,test}/classNN/NNNN.png."""
    generator = torch.Generator().manual_seed(0)
    for split, count in DTD_SPLITS.items():
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % CLASSES:02d}")
            os.makedirs(folder, exist_ok=True)
            shape = (img_size, img_size, 3)
            pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
            image = Image.fromarray(pixels.numpy())
            image.save(os.path.join(folder, f"{i:04d}.png"), compress_level=1)
    return root


def dtd_run(args):
    """train.py on a DTD-shaped folder, its own lines shown as they come; returns its wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable,
            os.path.join(HERE, "train.py"),
            *("--data", write_dtd_shaped(os.path.join(scratch, "dtd_shaped"), args.img_size)),
            *("--out", os.path.join(scratch, "run")),
            *("--model", args.model, "--weights", "none", "--device", args.device),
            *("--img-size", str(args.img_size), "--batch-size", str(args.batch_size)),
            *("--epochs", str(args.epochs)),
        ]
        started = time.perf_counter()
        status = subprocess.run(command).returncode
        wall = time.perf_counter() - started
    if status:
        sys.exit(f"bench.py: train.py failed (exit status {status}); its message is above")
    return wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_t16")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds: their median counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtd-run", action="store_true", help="time a whole train.py run")
    parser.add_argument("--epochs", type=int, default=100, help="for --dtd-run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU"
    print(f"{where}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    setting = f"{args.model}, {args.img_size} px, batch {args.batch_size}"
    if args.dtd_run:
        wall = dtd_run(args)
        steps = args.epochs * math.ceil(DTD_SPLITS["train"] / args.batch_size)
        print(
            f"\nthe DTD-shaped run ({setting}, {args.epochs} epochs, {steps} steps): {wall:.1f} s"
        )
        return
    precisions = ["fp32"]
    if native_bf16(device):
        precisions.append("bf16")
    else:
        print(f"bf16 not timed: this {device.type.upper()} does not compute bf16 natively")
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (args.batch_size,), device=device)
    methods = list(METHODS)
    if args.model.startswith("vit") and all(map(importlib.util.find_spec, ("timm", "peft"))):
        methods.append("lora")
    else:
        print(
            "lora not timed: it needs timm and peft installed (neither is a dependency), and a ViT"
        )
    print(f"{setting}; the median of {args.rounds} rounds\n", flush=True)
    training = training_table(args, device, methods, precisions, images, labels)
    print(training + "\n", flush=True)
    print(inference_table(args, device, precisions, images), flush=True)


if __name__ == "__main__":
    main()
