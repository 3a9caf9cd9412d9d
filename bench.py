"""Speed and memory of ARC, measured in one run on one machine, as a table.

    python bench.py                        # a small ViT on the CPU (vit_t16, 64 px): a minute
    python bench.py --model vit_b16 --img-size 224 --batch-size 32   # the paper's setting (a GPU)

Training: images/s of train.py's own step (forward, backward, clip, AdamW on the trainable tensors;
bf16 autocast on CUDA) for arc, arc_att, linear and full, and the peak GPU memory of each.
Inference: images/s of the plain model, ARC unfolded, and ARC folded by arc.reparameterize.
"""
import argparse
import copy
import platform
import time

import torch

import arc
import train


def timed(fn, device, warmup, iters):
    """Median seconds per call after `warmup` calls (CUDA timings synchronise around each call)."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build(args, method):
    config = {"model": args.model, "img_size": args.img_size, "method": method, "rank": 50, "adapter_dropout": 0.1}
    torch.manual_seed(0)
    return train.build_model(config, num_classes=47)


def bench_training(args, device, method):
    model = build(args, method)
    train.mark_trainable(model, method)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 47, (args.batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: train.train_step(model, optimizer, params, images, labels, 1 / args.batch_size),
                    device, args.warmup, args.iters)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return args.batch_size / seconds, memory


@torch.no_grad()
def bench_inference(args, device, model):
    model.to(device).eval()
    images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)

    def forward():
        with train.autocast(device):
            model(train.normalize(images))
    return args.batch_size / timed(forward, device, args.warmup, args.iters)


def machine(device):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return f"{where}; torch {torch.__version__}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_t16", choices=sorted(train.MODELS))
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'} on {machine(device)}\n")
    print(f"{'training':<22}{'images/s':>10}{'peak GPU GiB':>14}")
    for method in ("arc", "arc_att", "linear", "full"):
        speed, memory = bench_training(args, device, method)
        print(f"{method:<22}{speed:>10.1f}{memory if memory is not None else '-':>14.3}")
    plain, unfolded = build(args, "linear"), build(args, "arc")
    folded = arc.reparameterize(copy.deepcopy(unfolded))
    speeds = {name: bench_inference(args, device, model)
              for name, model in (("plain", plain), ("arc unfolded", unfolded), ("arc folded", folded))}
    print(f"\n{'inference':<22}{'images/s':>10}{'time vs plain':>14}")
    for name, speed in speeds.items():
        print(f"{name:<22}{speed:>10.1f}{speeds['plain'] / speed:>14.3f}")


if __name__ == "__main__":
    main()
