"""Speed and memory of ARC, measured in one run on one machine, as a table.

    python bench.py                        # a small ViT on the CPU (vit_t16, 64 px): a minute
    python bench.py --model vit_b16 --img-size 224 --batch-size 32   # the paper's setting (a GPU)

Training: images/s of train.py's own step (forward, backward, clip, AdamW on the trainable tensors;
bf16 autocast on CUDA) for arc, arc_att, linear and full, and on CUDA the peak memory of each.
Inference: images/s of the plain model, ARC unfolded, and ARC folded by arc.reparameterize.
The variants are timed in turn, round after round, and the median is reported, so that a machine
whose speed drifts (a shared CPU, a GPU warming up) slows them all alike.
"""
import argparse
import copy
import platform
import statistics
import time

import torch

import arc
import train

METHODS = ("arc", "arc_att", "linear", "full")


def interleaved(calls, device, warmup, rounds):
    """{name: median seconds per call}, calling each in turn every round."""
    seconds = {name: [] for name in calls}
    for round in range(warmup + rounds):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def build(args, method):
    torch.manual_seed(0)
    config = {"model": args.model, "img_size": args.img_size, "method": method, "rank": 50, "adapter_dropout": 0.1}
    return train.build_model(config, num_classes=47)


def training_step(args, device, method):
    """A closure running one train.py step of `method` on a fixed batch."""
    model = build(args, method)
    train.mark_trainable(model, method)
    model.to(device).train()
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
            model(train.normalize(images))
    return forward


def peak_memory(args, device, method):
    """GiB at the peak of a training step, model and optimizer state included (one model on the GPU)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = training_step(args, device, method)
    step(), step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def machine(device):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    return f"{where}; torch {torch.__version__}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_t16", choices=sorted(train.MODELS))
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, median of {args.rounds} rounds "
          f"on {machine(device)}\n")

    memory = {m: peak_memory(args, device, m) for m in METHODS} if device.type == "cuda" else {}
    speed = interleaved({m: training_step(args, device, m) for m in METHODS}, device, args.warmup, args.rounds)
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
