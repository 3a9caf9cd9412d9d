"""Tests of speed and the GPU: bench.py, .ci/gpu, and the CUDA tests (marked cuda, skipped without a
GPU; `pytest -m cuda` selects them, and .ci/gpu runs them on a GPU machine)."""

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import arc
import bench
import data
import paper
import swin
import train
import vit
from conftest import (
    ARC_RANK,
    HERE,
    TINY_RUN,
    TimmStyleViT,
    fgvc_pictures,
    metrics,
    one_thread,
    randomize_arc,
    run_train,
    signal_at_step,
    swin_tiny,
    trained,
)

# --------------------------------------------------------------------------------------------------
# Speed (bench.py) and the GPU check (.ci/gpu), on the CPU

NUMBER = r"(\d[\d,]*\.\d+)"
TINY_BENCH = ["--img-size", "16", "--batch-size", "8", "--rounds", "1", "--warmup", "1"]


def test_bench_times_a_whole_dtd_shaped_run_through_train_py(capfd, monkeypatch):
    # train.py runs in a process of its own: one thread there too, on a shared CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--dtd-run", "--epochs", "1", "--model", "vit_t16", "--img-size", "16"]
    bench.main([*args, "--device", "cpu"])
    printed = capfd.readouterr().out
    # an image folder of DTD's shape; ARC's trainable tensors for vit_t16 and 47 classes
    assert "dtd_shaped: 1000 train / 1880 test images, 47 classes" in printed
    assert "34,079 trainable parameters" in printed
    summary = r"the DTD-shaped run \(vit_t16, 16 px, batch 32, 1 epochs, 32 steps\): (\d+\.\d) s"
    assert float(re.search(summary, printed).group(1)) > 0


def test_bench_says_in_one_line_when_the_timed_run_fails(capfd, monkeypatch):
    # 17 px does not suit vit_t16's 16 px patches: train.py says so, and bench.py adds one line
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--dtd-run", "--epochs", "1", "--model", "vit_t16", "--img-size", "17"]
    with pytest.raises(SystemExit) as stop:
        bench.main([*args, "--device", "cpu"])
    message = r"bench.py: train.py failed \(exit status [1-9]\d*\); its message is above"
    assert re.fullmatch(message, stop.value.code)
    assert "--img-size 17" in capfd.readouterr().err


def test_bench_waits_for_the_device_it_times(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    bench.interleaved({"step": lambda: None}, torch.device("cuda:1"), warmup=1, rounds=2)
    # before and after each of 3 calls, on the GPU it times
    assert waited == [torch.device("cuda:1")] * 6


def speed_row(printed, name, trainable, native):
    """The markdown row of `name`: its trainable parameters (None: no such column), its images/s
    in float32, and where bf16 is native its images/s in bf16 and the speed-up."""
    cells = [re.escape(name), NUMBER]
    if trainable:
        cells.insert(1, trainable)
    if native:
        cells += [NUMBER, NUMBER + "x"]
    return re.search(r"^\| " + r" \| ".join(cells) + r" \|$", printed, re.M)


@pytest.mark.parametrize("native", [True, False])
def test_bench_times_each_method_in_each_precision(capsys, monkeypatch, native):
    # bf16 is timed only where the device computes it natively (the hardware mocked both ways)
    import importlib.util

    monkeypatch.setattr(bench, "native_bf16", lambda device: native)
    with one_thread():
        bench.main([*TINY_BENCH, "--model", "vit_t16", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"1 CPU threads, torch {torch.__version__}" in printed
    assert "vit_t16, 16 px, batch 8; the median of 1 rounds" in printed
    assert ("bf16 not timed: this CPU does not compute bf16 natively" in printed) != native
    # trainable: ARC's for vit_t16 and 47 classes, the head alone, every weight
    full = sum(p.numel() for p in vit.vit_t16(num_classes=47, img_size=16).parameters())
    trainable = {"arc": "34,079", "arc_att": r"[\d,]+", "linear": "9,071", "full": f"{full:,}"}
    for method, count in trainable.items():
        assert speed_row(printed, method, count, native), method
    for variant in ("plain", "arc unfolded", "arc folded"):
        assert speed_row(printed, variant, None, native), variant
    if importlib.util.find_spec("timm") and importlib.util.find_spec("peft"):
        assert speed_row(printed, "lora", r"[\d,]+", native)
    else:
        assert "lora not timed: it needs timm and peft installed" in printed


def test_bench_times_swin_too(capsys, monkeypatch):
    # a tiny Swin stands in for Swin-B; LoRA (timm + peft) is timed for ViTs only
    monkeypatch.setitem(bench.MODELS, "swin_b", swin_tiny)
    with one_thread():
        bench.main([*TINY_BENCH, "--img-size", "64", "--model", "swin_b", "--device", "cpu"])
    printed = capsys.readouterr().out
    native = bench.native_bf16(torch.device("cpu"))
    for method in bench.METHODS:
        assert speed_row(printed, method, r"[\d,]+", native), method
    assert "lora not timed" in printed


def test_bench_bf16_step_agrees_with_the_float32_step_and_trains_only_what_arc_trains():
    # bench's own step in bf16 autocast on the CPU against float32: the loss within 1%, every
    # trainable gradient at cosine > 0.99; the frozen weights stay float32 and untouched
    torch.manual_seed(0)
    model = vit.vit_t16(num_classes=5, img_size=32, arc="arc", adapter_dropout=0.0).train()
    arc.mark_trainable(model)
    with torch.no_grad():  # with c_att = 0 (its init) W_att would get no gradient
        for name in arc.arc_state_dict(model):
            model.get_parameter(name).normal_(0, 0.1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 5, (8,))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses, gradients = {}, {}
    for precision in ("fp32", "bf16"):
        net = copy.deepcopy(model)
        with one_thread():
            losses[precision] = bench.training_step(net, images, labels, precision)().item()
        gradients[precision] = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
        for name, param in net.named_parameters():
            if name in frozen:
                assert param.grad is None and param.dtype == torch.float32
                assert torch.equal(param, frozen[name]), name
            else:
                assert not torch.equal(param, model.get_parameter(name)), name  # it trained
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert len(gradients["fp32"]) == 2 + 2 * 12 * 2 + 2
    for name, expected in gradients["fp32"].items():
        cosine = torch.nn.functional.cosine_similarity(
            expected.flatten(), gradients["bf16"][name].flatten(), dim=0
        )
        assert cosine > 0.99, (name, cosine.item())


def run_ci_gpu(cwd, **env):
    return subprocess.run(
        ["bash", os.path.join(HERE, ".ci", "gpu")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_ci_gpu_says_in_one_line_that_there_is_no_gpu(tmp_path):
    # CUDA_VISIBLE_DEVICES empty hides any GPU: the same on CI and on a GPU machine; run from
    # another folder
    result = run_ci_gpu(tmp_path, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path), PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA GPU" in result.stdout
    assert os.listdir(tmp_path) == []  # no report
    # an environment whose torch does not import fails, rather than pass unchecked
    broken = tmp_path / "python"
    broken.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'raise ImportError(\"no torch\")'\n")
    broken.chmod(0o755)
    result = run_ci_gpu(tmp_path, PYTHON=str(broken))
    assert result.returncode == 1
    assert "does not import" in result.stdout and "no torch" in result.stderr


def test_a_gpu_check_stopped_by_its_time_limit_stops_there_and_keeps_what_it_measured(tmp_path):
    # A stand-in python that has a GPU, passes the tests at once and never finishes a bench: the
    # check stops that bench at its time limit, runs nothing after it, and the report keeps the
    # tests' output and what the bench printed, then says where and why it stopped
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "    -c) exit 0 ;;\n"  # torch.cuda.is_available()
        '    -m) echo "9 passed in 1.00s" ;;\n'  # pytest -m cuda
        '    *) echo "bench started"; exec sleep 60 ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    result = run_ci_gpu(tmp_path, PYTHON=str(fake), OUT="reports", GPU_CHECK_SECONDS="3")
    assert result.returncode == 124, result.stdout + result.stderr
    report = (tmp_path / "reports" / "gpu_report.md").read_text()
    assert report.startswith("# ARC: the GPU check")
    sections = report.split("\n## ")[1:]
    assert [section.split("\n")[0].split()[1:3] for section in sections] == [
        ["-m", "pytest"],
        ["bench.py", "--model"],
        ["bench.py", "--model"],
        ["bench.py", "--dtd-run"],
    ]
    assert "9 passed in 1.00s" in sections[0] and "exit status 0" in sections[0]
    assert "bench started" in sections[1]
    assert "exit status 124: stopped at the time limit" in sections[1]
    for section in sections[2:]:
        assert "not run: the time limit was reached" in section
    assert result.stdout.endswith(f"the report: {tmp_path}/reports/gpu_report.md\n")


# The CUDA tests: each is marked cuda (`pytest -m cuda` selects them; .ci/gpu runs them on a GPU
# machine) and skips without a CUDA GPU (CI has none). On the GPU: bf16 autocast, fused AdamW, the
# data on the device, NCCL.
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run .ci/gpu on a GPU machine)"
)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """TINY_RUN trained on the GPU: bf16 autocast, frozen weights in bf16, fused AdamW, the data on
    the device."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    assert run_train(*TINY_RUN, "--device", "cuda", "--out", out) == 0
    return out


def _accuracy(printed):
    return float(re.search(r"test accuracy ([\d.]+)%", printed).group(1))


def train_step(net, optimizer, params, images, labels, loss_weight):
    """One step of train.train's loop: bf16 autocast on CUDA (float32 on the CPU), the summed
    loss times its weight, backward, the gradient clipped to norm 1, AdamW; returns the loss."""
    precision = "bf16" if images.is_cuda else "fp32"
    with train.autocast(images.device, precision):
        logits = net(data.normalize(images))
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") * loss_weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()


@pytest.mark.cuda
@needs_gpu
def test_cuda_a_bf16_step_agrees_with_the_float32_cpu_step():
    """train_step under bf16 autocast with the frozen weights in bf16 (frozen_in_bf16) on CUDA
    against the plain float32 step on the CPU, same model and batch, adapter dropout 0 (no masks to
    differ). bf16 keeps 8 bits of mantissa (relative rounding 2^-9), so the two cannot agree
    bitwise. Tolerances: the loss within 1% (relative); every trainable tensor's gradient at cosine
    similarity above 0.99 with the float32 one, i.e. an error vector of up to ~14% of its norm. The
    CPU's own bf16 autocast, as a stand-in, gave a loss within 0.16% and cosines >= 0.9997 (errors
    <= 2.3%) on this model, so the bounds leave a margin of about 6x, and wrong weights, a missed
    cast or a gradient lost to bf16 underflow still fail them."""
    torch.manual_seed(0)
    model = vit.vit_t16(num_classes=5, img_size=32, arc="arc", adapter_dropout=0.0).train()
    arc.mark_trainable(model)
    with (
        torch.no_grad()
    ):  # the head and every ARC tensor non-zero: with c_att = 0 (its init) W_att gets no gradient
        for name in arc.arc_state_dict(model):
            model.get_parameter(name).normal_(0, 0.1)
    on_gpu = copy.deepcopy(model).cuda()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    losses, gradients = {}, {}
    for device, net in (("cpu", model), ("cuda", on_gpu)):
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device == "cuda")
        with train.frozen_in_bf16(net, enabled=device == "cuda"):
            assert net.blocks[0].attn.qkv.weight.dtype == (
                torch.bfloat16 if device == "cuda" else torch.float32
            )
            loss = train_step(net, optimizer, params, images.to(device), labels.to(device), 1 / 8)
        losses[device] = loss.item()
        gradients[device] = {
            name: p.grad.float().cpu() for name, p in net.named_parameters() if p.requires_grad
        }
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-2)
    assert (
        gradients["cpu"].keys() == gradients["cuda"].keys()
        and len(gradients["cpu"]) == 2 + 2 * 12 * 2 + 2
    )
    for name, expected in gradients["cpu"].items():
        assert expected.norm() > 0, name
        cosine = torch.nn.functional.cosine_similarity(
            expected.flatten(), gradients["cuda"][name].flatten(), dim=0
        )
        assert cosine > 0.99, (name, cosine.item())


@pytest.mark.cuda
@needs_gpu
def test_cuda_the_training_loop_makes_no_host_sync():
    """What train.train does at each step (the learning rate, train_step, `losses[step] = ...`, the
    Loader's next batch of a Preloaded split and of an FGVC-like Resized split, both on the device;
    adapter dropout 0.1 drawing from the CUDA generator) under
    torch.cuda.set_sync_debug_mode("error"), which raises at any synchronizing call (.item(),
    .tolist(), .cpu(), a blocking copy, nonzero). Once an epoch, outside the check: the Loader's
    first batch, which copies the epoch's indices to the GPU and draws a Resized split's crops
    (their shapes read on the host). The first step ever (AdamW's state, normalize's constants) runs
    before. Exact: one sync anywhere fails."""
    import itertools

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = vit.vit_t16(num_classes=10, img_size=32, arc="arc").to(device).train()
    arc.mark_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    cfg, generator = (
        SimpleNamespace(lr=1e-3, warmup_epochs=1, epochs=2),
        torch.Generator().manual_seed(0),
    )
    labels = torch.randint(0, 10, (24,), generator=generator)
    square = data.Preloaded(
        torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=generator), labels
    )
    shapes = torch.tensor(
        [[32 + k % 7, 32 + 3 * k % 11] for k in range(24)]
    )  # (h, w), each at least the crop
    size = int((3 * shapes[:, 0] * shapes[:, 1]).sum())
    pixels = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
    resized = data.Resized(pixels, shapes, labels, 32)
    with train.frozen_in_bf16(model, True):
        train_step(
            model, optimizer, params, *next(data.Loader(square, device)([torch.arange(8)])), 1 / 8
        )
        for split in (square, resized):  # as train.train's loop, the batches drawn as the steps go
            loader = data.Loader(split, device)
            assert loader.split.labels.device.type == "cuda"  # the device path
            order = torch.randperm(24, generator=generator)
            indices, weights = train.shares(order, 8, SimpleNamespace(rank=0, world=1))
            losses, batches = torch.zeros(len(indices), device=device), loader(indices, seed=3)
            first = next(batches)  # once an epoch: the indices sent, the crops drawn
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with pytest.raises(RuntimeError, match="synchroniz"):  # the check is on
                    losses.sum().item()
                for step, (images, targets) in enumerate(itertools.chain([first], batches)):
                    for group in optimizer.param_groups:
                        group["lr"] = train.lr_at(step, cfg, len(indices))
                    losses[step] = train_step(
                        model, optimizer, params, images, targets, weights[step]
                    )
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert step == 2 and torch.isfinite(losses).all() and (losses > 0).all()


@pytest.mark.cuda
@needs_gpu
def test_cuda_evaluation_and_eval_only_give_the_cpu_s_accuracy(cuda_run, capsys):
    """A run trained on CUDA: its own test (bf16, in the run), and --eval-only of adapters.pth and
    folded.pth on CUDA (bf16) and on the CPU (float32). The CPU's two agree exactly (as on CI). Each
    bf16 figure is within one test image (0.5 points of 200) of the CPU's: bf16 logits differ from
    float32 ones by ~0.4% of the largest (measured with the CPU's bf16 autocast), which can flip a
    near-tie, and 2 epochs leave a margin of more than 1 logit on most images."""
    logged = metrics(cuda_run)[-1]["test_acc"]
    accuracy = {}
    for device in ("cpu", "cuda"):
        for name in ("adapters.pth", "folded.pth"):
            assert (
                run_train(
                    "--eval-only",
                    "--checkpoint",
                    cuda_run / name,
                    "--workers",
                    "0",
                    "--device",
                    device,
                )
                == 0
            )
            accuracy[device, name] = _accuracy(capsys.readouterr().out)
    one_image = 100 / (data.SYNTHETIC_CLASSES * data.SYNTHETIC_TEST)
    cpu = accuracy["cpu", "adapters.pth"]
    assert accuracy["cpu", "folded.pth"] == cpu and logged > 60
    for key, value in [*accuracy.items(), ("the run's own test", logged)]:
        assert abs(value - cpu) <= one_image + 1e-6, (key, value, cpu)


@pytest.mark.cuda
@needs_gpu
def test_cuda_a_folded_model_trained_on_the_gpu_loads_on_the_cpu_with_the_gpu_s_logits(cuda_run):
    """folded.pth of the CUDA run (float32 tensors on the CPU) loads strictly into a plain vit_t16
    on the CPU. Its float32 logits against the same model's on CUDA, and against the unfolded CUDA
    model (the frozen weights from the seed, adapters.pth): within 2e-3 of the largest logit.
    Float32 on both devices agrees to ~1e-6, but cuDNN may run a float32 convolution (the patch
    embedding) in TF32 (10-bit mantissa); a wrong fold moves logits by O(1). Under bf16 autocast on
    CUDA: within 3e-2 (bf16 is ~0.4% off, measured on the CPU's bf16), the same class on all but at
    most one of the 64 images."""
    state = trained(cuda_run / "folded.pth")
    assert all(
        v.device.type == "cpu" and v.dtype == torch.float32
        for v in state.values()
        if v.is_floating_point()
    )
    plain = vit.vit_t16(num_classes=10, img_size=16).eval()
    plain.load_state_dict(state, strict=True)
    saved = torch.load(cuda_run / "adapters.pth", weights_only=True)
    unfolded = train.prepare_model(
        SimpleNamespace(**{**paper.DEFAULTS, **saved["config"]}), 10, None, log=print
    )
    train.load_trained_tensors(unfolded, saved["state_dict"], "adapters.pth")
    images = data.normalize(data.build("synthetic", img_size=16, log=None).test.images[:64])
    with torch.no_grad():
        expected = plain(images)
        on_gpu = copy.deepcopy(plain).cuda()
        float32 = [on_gpu(images.cuda()).cpu(), unfolded.cuda().eval()(images.cuda()).cpu()]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = on_gpu(images.cuda()).float().cpu()
    scale = expected.abs().max()
    assert scale > 1
    for logits in float32:
        assert (logits - expected).abs().max() <= 2e-3 * scale
    assert (bf16 - expected).abs().max() <= 3e-2 * scale
    assert (bf16.argmax(-1) != expected.argmax(-1)).sum() <= 1


@pytest.mark.cuda
@needs_gpu
def test_cuda_a_stopped_run_restores_the_cuda_random_state_and_resumes_to_the_same_weights(
    cuda_run, tmp_path, monkeypatch, capsys
):
    """Ctrl-C in epoch 2 of a CUDA run with adapter dropout 0.1 (its masks drawn from the CUDA
    generator), then --resume: checkpoint.pth holds the CUDA generator's state, resuming sets it,
    and the resumed run ends with the uninterrupted run's weights. Tolerance: CUDA kernels are not
    all deterministic (atomic adds in some backward kernels), and Adam can amplify a last-bit
    difference, so the resumed weights must be within a tenth of the difference that a lost CUDA
    state makes (the same resume with set_rng_state a no-op, which replays epoch 1's masks), not
    bitwise equal; on a deterministic GPU the gap is 0."""
    cut, unrestored = tmp_path / "cut", tmp_path / "unrestored"
    with monkeypatch.context() as patch:
        patch.setattr(train, "lr_at", signal_at_step(16 + 5))  # 16 steps an epoch: epoch 2, step 5
        assert run_train(*TINY_RUN, "--device", "cuda", "--out", cut) == 128 + signal.SIGINT
    assert "stopped by SIGINT" in capsys.readouterr().err
    state = torch.load(cut / "checkpoint.pth", weights_only=True)["rng"][0][1]
    assert isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.numel() > 0
    shutil.copytree(cut, unrestored)
    restore, restored = torch.cuda.set_rng_state, []
    with monkeypatch.context() as patch:
        patch.setattr(
            torch.cuda,
            "set_rng_state",
            lambda new, device="cuda": restored.append(new) or restore(new, device),
        )
        assert run_train(*TINY_RUN, "--device", "cuda", "--out", cut, "--resume", cut) == 0
        assert any(torch.equal(new, state) for new in restored)
        patch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": None)
        assert (
            run_train(*TINY_RUN, "--device", "cuda", "--out", unrestored, "--resume", unrestored)
            == 0
        )
    straight, resumed, lost = (trained(out / "adapters.pth") for out in (cuda_run, cut, unrestored))
    gap = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    wrong = max((straight[k] - lost[k]).abs().max().item() for k in straight)
    assert wrong > 0 and gap <= wrong / 10, (gap, wrong)
    assert [m["epoch"] for m in metrics(cut)] == [1, 2]


@pytest.mark.cuda
@needs_gpu
def test_cuda_swin_b_trains_a_bf16_step_at_224_px_and_folds_exactly():
    """Swin-B at 224 px (masked, shifted window attention: flash attention cannot take the mask) on
    CUDA: two bf16 steps of train_step with the frozen weights in bf16, a finite loss and a non-zero
    gradient for every trainable tensor, the frozen weights back bitwise in float32. Then the fold:
    float32 logits of 4 images before and after arc.reparameterize within 1e-3 of the largest
    (train.py's own check, fold_and_compare); the adapters (randomised) move the logits by far more
    than that."""
    torch.manual_seed(0)
    model = swin.swin_b(num_classes=47, img_size=224, arc="arc").cuda().train()
    arc.mark_trainable(model)
    with (
        torch.no_grad()
    ):  # c_att starts at 0: randomise the c_l and b_l so that both sides fold something
        for name in arc.arc_state_dict(model):
            if name.endswith((".scale", ".bias")) and "adapter" in name:
                model.get_parameter(name).normal_(0, 0.1)
    frozen = {
        name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 47, (8,), device="cuda")
    with train.frozen_in_bf16(model, True):
        assert (
            model.layers[0].blocks[1].attn.qkv.weight.dtype == torch.bfloat16
            and model.layers[0].blocks[1].shift
        )
        losses = [train_step(model, optimizer, params, images, labels, 1 / 8) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    assert all(
        p.dtype == torch.float32 and torch.equal(p, frozen[name])
        for name, p in model.named_parameters()
        if not p.requires_grad
    )
    model.eval()
    x = data.normalize(images[:4])
    with torch.no_grad():
        plain = copy.deepcopy(model)
        for name in arc.arc_state_dict(plain):
            if name.endswith((".scale", ".bias")) and "adapter" in name:
                plain.get_parameter(name).zero_()  # identity adapters: the backbone alone
        backbone, before = plain(x), model(x)
        after = arc.reparameterize(model)(x)
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-3 * scale
    assert (before - backbone).abs().max() > 1e-2 * scale


@pytest.mark.cuda
@needs_gpu
def test_cuda_torchrun_trains_one_process_over_nccl(tmp_path):
    """torchrun --nproc_per_node=1 with --device cuda: train.py initialises NCCL (its control
    messages on gloo), sets its GPU from LOCAL_RANK, trains, folds and saves; exit 0 and the log
    names cuda:0."""
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "train.py",
            *TINY_RUN,
            "--device",
            "cuda",
            "--out",
            str(out),
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cuda:0 in bf16" in result.stdout, result.stdout[-2000:]
    assert [m["epoch"] for m in metrics(out)] == [1, 2] and (out / "folded.pth").exists()


@pytest.mark.cuda
@needs_gpu
def test_cuda_frozen_weights_wait_in_host_memory_and_come_back_bitwise():
    """frozen_in_bf16 on ViT-B/16 on CUDA: inside, the GPU holds the frozen linear and conv weights
    in bf16 only (their float32 originals wait in host memory), so allocated memory falls by half
    their float32 size (171 MB), not rises by their bf16 size; after, it is back, and every
    parameter is float32 and bitwise its value before. Tolerance: a tenth of the float32 size (34
    MB), for the caching allocator's rounding; the wrong outcomes differ by 5 tenths."""
    import gc

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = vit.vit_b16(num_classes=47, arc="arc")
    arc.mark_trainable(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = (
        sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            for p in m.parameters(recurse=False)
            if not p.requires_grad
        )
        * 4
    )  # float32 bytes
    assert frozen > 340e6  # 85.6M values
    gc.collect()
    gc.disable()  # no other test's CUDA tensors freed in between
    try:
        start = torch.cuda.memory_allocated(device)
        model.to(device)
        loaded = torch.cuda.memory_allocated(device) - start
        with train.frozen_in_bf16(model, True):
            inside = torch.cuda.memory_allocated(device) - start
        after = torch.cuda.memory_allocated(device) - start
    finally:
        gc.enable()
    assert loaded >= frozen
    assert abs(inside - (loaded - frozen / 2)) <= frozen / 10, (loaded, inside, frozen)
    assert abs(after - loaded) <= frozen / 10, (loaded, after)
    for name, p in model.named_parameters():
        assert (
            p.dtype == torch.float32
            and p.device.type == "cuda"
            and torch.equal(p.cpu(), before[name])
        ), name


@pytest.mark.cuda
@needs_gpu
def test_cuda_a_split_kept_in_host_memory_gives_the_device_path_s_batches_bitwise(
    tmp_path, monkeypatch
):
    """The Loader's host path (a split too large for the GPU: gathered in host memory, sent pinned
    and non-blocking) against its device path, for an FGVC training split (random crops and flips
    from the epoch's seed) and a test split: bitwise the same uint8 batches and labels, on the
    GPU."""
    task, _ = fgvc_pictures(tmp_path)
    device, batches = (
        torch.device("cuda"),
        [torch.tensor([4, 1]), torch.tensor([0, 3, 2]), torch.tensor([2, 2, 0, 1])],
    )
    for split in (task.train, task.test):
        on_device = data.Loader(split, device)
        with monkeypatch.context() as patch:
            patch.setattr(data, "fits_on_device", lambda nbytes, device: False)
            from_host = data.Loader(split, device)
        assert (
            on_device.split.labels.device.type == "cuda"
            and from_host.split.labels.device.type == "cpu"
        )
        expected, got = list(on_device(batches, seed=5)), list(from_host(batches, seed=5))
        assert len(expected) == len(got) == 3
        for (images, labels), (host_images, host_labels) in zip(expected, got, strict=True):
            assert host_images.device.type == host_labels.device.type == "cuda"
            assert torch.equal(images.cpu(), host_images.cpu()) and torch.equal(
                labels.cpu(), host_labels.cpu()
            )


@pytest.mark.cuda
@needs_gpu
def test_cuda_add_adapters_on_a_model_already_on_the_gpu():
    """add_adapters on a model already on the GPU: the adapters are made there too (else the first
    forward fails on a device mismatch), and they fold there. Tolerance: 1e-4 of the largest logit,
    float32 (TF32 convolutions)."""
    model = TimmStyleViT().cuda().eval()
    arc.add_adapters(model, rank=ARC_RANK)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    randomize_arc(model.cpu()).cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        adapted = model(images)
        assert (
            arc.reparameterize(model)(images) - adapted
        ).abs().max() <= 1e-4 * adapted.abs().max()
