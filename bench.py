"""Speed and memory of ARC, measured in one run on one machine, as a table.

    python bench.py                        # a small ViT on the CPU (vit_t16, 64 px): a minute
    python bench.py --model vit_b16 --img-size 224 --batch-size 32   # the paper's setting (a GPU)
    python bench.py --run dtd              # a whole VTAB-1k DTD run, timed (ViT-B/16, 224 px, 100 epochs)
    python bench.py --run dtd --epochs 1 --model vit_t16 --img-size 32   # the same path, short, on a CPU

Training: images/s of train.py's own step (forward, backward, clip, AdamW on the trainable tensors;
bf16 autocast on CUDA) for arc, arc_att, linear and full, and on CUDA the peak memory of each.
Inference: images/s of the plain model, ARC unfolded, and ARC folded by arc.reparameterize.
The variants are timed in turn, round after round, and the median is reported, so that a machine
whose speed drifts (a shared CPU, a GPU warming up) slows them all alike.
--run dtd: train.py's own run (train.run_task) on images of DTD's shape under VTAB-1k (1,000 training and
1,880 test images, 47 classes, written as an image folder first), with the default recipe, from start-up
(decoding included) to folded.pth, and the wall time split into start-up, training, testing and finish.
"""
import argparse
import contextlib
import copy
import os
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from PIL import Image

import arc
import data
import runs
import train

METHODS = ("arc", "arc_att", "linear", "full")


def interleaved(calls, device, warmup, rounds):
    """{name: median seconds per call}, calling each in turn every round."""
    seconds = {name: [] for name in calls}
    for round in range(warmup + rounds):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the device timed (--device cuda:1), not the current one
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def build(args, method):
    torch.manual_seed(0)
    cfg = SimpleNamespace(**{**paper.DEFAULTS, "model": args.model, "img_size": args.img_size, "method": method,
                             "weights": "none"})
    return train.prepare_model(cfg, 47, None, log=print)


def training_step(args, device, method, stack):
    """A closure running one train.py step of `method` on a fixed batch, with the frozen weights in bf16
    on CUDA as train.py keeps them (until `stack` closes)."""
    model = build(args, method).to(device).train()
    stack.enter_context(train.frozen_in_bf16(model, device.type == "cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 47, (args.batch_size,), device=device)
    return lambda: train.train_step(model, optimizer, params, images, labels, 1 / args.batch_size)


def inference(args, device, model):
    model.to(device).eval()
    images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)

    @torch.no_grad()
    def forward():
        with train.autocast(device):
            model(data.normalize(images))
    return forward


def peak_memory(args, device, method):
    """GiB at the peak of a training step, model and optimizer state included (one model on the GPU)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with contextlib.ExitStack() as stack:
        step = training_step(args, device, method, stack)
        step(), step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def write_dtd_shaped(root, img_size, seed=0):
    """An image folder shaped as VTAB-1k DTD: 1,000 train and 1,880 test PNGs of 47 classes, random pixels."""
    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", 1000), ("test", 1880)):
        pixels = torch.randint(0, 256, (count, img_size, img_size, 3), dtype=torch.uint8, generator=generator)
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % 47:02d}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[i].numpy()).save(os.path.join(folder, f"{i:04d}.png"), compress_level=1)
    return root


def dtd_run(args, device):
    """train.run_task on images shaped as VTAB-1k DTD; prints the wall time split, returns the result."""
    with tempfile.TemporaryDirectory() as scratch:
        images = write_dtd_shaped(os.path.join(scratch, "dtd_shaped"), args.img_size)
        given = {"data": images, "model": args.model, "img_size": args.img_size, "weights": "none",
                 "epochs": args.epochs, "batch_size": args.batch_size}
        ctx = runs.setup_distributed(args.device, workers=min(8, os.cpu_count() or 1))
        started = time.time()
        result = train.run_task(given, os.path.join(scratch, "run"), ctx)
        wall, seconds = time.time() - started, result["seconds"]
    print(f"\nDTD-shaped run, {args.model}, {args.img_size} px, {args.epochs} epoch(s) on {machine(device)}:")
    for part, what in (("setup", "start-up: model, data decoded to the device"),
                       ("training", f"training: {1000 * args.epochs / seconds['training']:.0f} images/s"),
                       ("testing", "testing: every 10 epochs and after the last"),
                       ("finish", "finish: adapters.pth, folding, folded.pth")):
        print(f"{seconds[part]:9.1f} s  {what}")
    print(f"{wall:9.1f} s  wall time")
    return result


def machine(device):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    return f"{where}; torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", choices=["dtd"], help="time a whole run instead of single steps")
    p.add_argument("--epochs", type=int, default=100, help="for --run")
    p.add_argument("--model", choices=sorted(train.MODELS), help="default: vit_t16, or vit_b16 for --run")
    p.add_argument("--img-size", type=int, help="default: 64, or 224 for --run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.model = args.model or ("vit_b16" if args.run else "vit_t16")
    args.img_size = args.img_size or (224 if args.run else 64)
    device = torch.device(args.device)
    if args.run:
        return dtd_run(args, device)
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, median of {args.rounds} rounds "
          f"on {machine(device)}\n")

    memory = {m: peak_memory(args, device, m) for m in METHODS} if device.type == "cuda" else {}
    with contextlib.ExitStack() as stack:
        steps = {m: training_step(args, device, m, stack) for m in METHODS}
        speed = interleaved(steps, device, args.warmup, args.rounds)
    print(f"{'training':<16}{'images/s':>10}{'vs full':>9}{'peak GiB':>10}")
    for m in METHODS:
        print(f"{m:<16}{args.batch_size / speed[m]:>10.1f}{speed['full'] / speed[m]:>8.2f}x"
              f"{memory[m] if memory else '-':>10.3}")

    unfolded = build(args, "arc")
    models = {"plain": build(args, "linear"), "arc unfolded": unfolded,
              "arc folded": arc.reparameterize(copy.deepcopy(unfolded))}
    speed = interleaved({name: inference(args, device, model) for name, model in models.items()},
                        device, args.warmup, args.rounds)
    print(f"\n{'inference':<16}{'images/s':>10}{'time vs plain':>15}")
    for name in models:
        print(f"{name:<16}{args.batch_size / speed[name]:>10.1f}{speed[name] / speed['plain']:>15.3f}")


if __name__ == "__main__":
    main()
