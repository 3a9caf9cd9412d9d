"""Tests of training: the step and the loop, resume and signals, checkpoints, and torchrun on the CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import arc
import data
import runs
import swin
import train
import vit
from conftest import (
    GOOD_IMAGES,
    HERE,
    TINY_RUN,
    fails_with_one_line,
    fgvc_cars,
    file_hashes,
    metrics,
    quick_run_args,
    randomize_arc,
    run_train,
    stop_at_call,
    tiny_vit,
    trained,
    write_dtd_release,
    write_vtab_with_broken_images,
)

# ---------------------------------------------------------------------------------------------------
# The step and the loop (train.py): learning runs, device reads, bf16, batch shares, NaN, recipes, the fold check


def test_a_synthetic_run_learns_and_folds(synthetic_run):
    history = metrics(synthetic_run)
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[-1]["loss"] < history[0]["loss"] / 3
    assert history[-1]["test_acc"] > 60  # 10 classes: chance is 10%
    assert os.path.getsize(synthetic_run / "adapters.pth") < 200_000


def test_the_same_seed_gives_the_same_loss_curve(synthetic_run, tmp_path):
    assert run_train(*TINY_RUN, "--out", tmp_path / "again") == 0
    assert [m["loss"] for m in metrics(tmp_path / "again")] == [
        m["loss"] for m in metrics(synthetic_run)
    ]


def test_saved_checkpoints_reproduce_the_accuracy(synthetic_run, capsys):
    accuracy = metrics(synthetic_run)[-1]["test_acc"]
    for name in ("adapters.pth", "folded.pth"):
        assert run_train("--eval-only", "--checkpoint", synthetic_run / name, "--workers", "0") == 0
        assert f"test accuracy {accuracy:.2f}%" in capsys.readouterr().out
    plain = vit.vit_t16(num_classes=10, img_size=16)
    plain.load_state_dict(
        trained(synthetic_run / "folded.pth"), strict=True
    )  # the folded model is a plain ViT
    adapters = trained(synthetic_run / "adapters.pth")
    assert any(".adapter_ffn." in k for k in adapters) and "head.weight" in adapters
    assert not any(k.startswith(("blocks.0.attn", "patch_embed")) for k in adapters)


def test_a_linear_probe_saves_loadable_checkpoints_too(tmp_path, capsys):
    out = tmp_path / "linear"
    assert (
        run_train(
            *TINY_RUN, "--method", "linear", "--epochs", "1", "--warmup-epochs", "0", "--out", out
        )
        == 0
    )
    accuracy = metrics(out)[-1]["test_acc"]
    assert set(trained(out / "adapters.pth")) == {"head.weight", "head.bias"}
    for name in ("adapters.pth", "folded.pth"):
        assert run_train("--eval-only", "--checkpoint", out / name, "--workers", "0") == 0
        assert f"test accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_dtd_end_to_end_with_auto_weights(tmp_path, monkeypatch, vit_b16_npz, capsys):
    classes = [f"texture{i}" for i in range(3)]
    write_dtd_release(tmp_path / "data", classes, (6, 3, 4))
    hub = tmp_path / "torch_home"
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(
        vit_b16_npz[0], hub / "hub" / "checkpoints" / "ViT-B_16.npz"
    )  # where --weights auto looks
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download")
    )
    out = tmp_path / "run"
    assert (
        run_train(
            "--data",
            "dtd",
            "--data-dir",
            tmp_path / "data",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--out",
            out,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "27 train" in printed and "12 test images, 3 classes" in printed
    assert (
        "vit_b16 arc: 98,739 trainable parameters" in printed
    )  # 2*(768*50) + 12*2*(50+768) + 768*3+3
    assert "(they agree)" in printed and "best over evaluated epochs" in printed
    assert len(metrics(out)) == 1 and os.path.getsize(out / "adapters.pth") < 1_000_000
    plain = vit.vit_b16(num_classes=3, img_size=32)
    plain.load_state_dict(trained(out / "folded.pth"), strict=True)
    monkeypatch.chdir(
        tmp_path / "torch_home"
    )  # elsewhere: --eval-only finds the run's data and weights itself
    assert run_train("--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0") == 0
    assert f"test accuracy {metrics(out)[-1]['test_acc']:.2f}%" in capsys.readouterr().out


def test_training_reads_device_values_once_an_epoch_not_once_a_step(tmp_path, monkeypatch):
    reads = []  # the lines of this project's files that read a value off the device

    def counting(original):
        def read(self):
            caller = sys._getframe(1).f_code.co_filename
            if (
                os.path.dirname(os.path.abspath(caller)) == HERE
            ):  # not torch's own CPU AdamW bookkeeping
                reads.append(sys._getframe(1).f_lineno)
            return original(self)

        return read

    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    assert (
        run_train(*TINY_RUN, "--out", tmp_path / "run") == 0
    )  # 2 epochs of 16 steps, evaluated each epoch
    # per epoch: the loss and the accuracy; at the end: the folding check. A read per step (a host sync on a
    # GPU) would add 32.
    assert len(reads) == 2 * 2 + 1, reads


def test_frozen_weights_in_bf16_give_what_autocast_gives_and_come_back_in_float32():
    model = randomize_arc(tiny_vit(num_classes=5, arc="arc")).eval()
    arc.mark_trainable(model)
    originals = {name: p for name, p in model.named_parameters()}
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images)
        with train.frozen_in_bf16(model, enabled=True):
            assert (
                model.blocks[0].attn.qkv.weight.dtype
                == model.patch_embed.proj.weight.dtype
                == torch.bfloat16
            )
            assert (
                model.blocks[0].norm1.weight.dtype
                == model.down_proj_att.weight.dtype
                == torch.float32
            )
            kept = model(images)
    assert torch.equal(kept, expected)  # bitwise: autocast made the same bf16 copies, once a step
    assert all(
        p is originals[name] and p.dtype == torch.float32 for name, p in model.named_parameters()
    )


@pytest.mark.parametrize("n, batch_size, world", [(33, 8, 2), (9, 8, 4), (16, 8, 2), (5, 32, 1)])
def test_no_process_gets_an_empty_batch_and_the_weights_give_the_batch_mean(n, batch_size, world):
    order = torch.randperm(n)
    per_rank = [
        train.shares(order, batch_size, SimpleNamespace(rank=r, world=world)) for r in range(world)
    ]
    for step in range(len(per_rank[0][0])):
        batch = order[step * batch_size : (step + 1) * batch_size]
        assert all(len(indices[step]) > 0 for indices, _ in per_rank)  # no kernel sees a batch of 0
        real = [indices[step] for indices, weights in per_rank if weights[step]]
        assert sorted(torch.cat(real).tolist()) == sorted(
            batch.tolist()
        )  # every image once, at its weight
        # the summed, weighted losses of all processes, averaged by DDP, give the batch's mean loss
        assert sum(
            weights[step] * len(indices[step]) for indices, weights in per_rank
        ) / world == pytest.approx(1)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    step = train.train_step
    calls = []

    def diverging_step(*args):
        calls.append(1)
        loss = step(*args)
        return loss * float("nan") if len(calls) == 16 + 7 else loss

    monkeypatch.setattr(train, "train_step", diverging_step)
    out = tmp_path / "nan"
    assert run_train(*TINY_RUN, "--out", out) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "nan or infinite at epoch 2, step 7" in error
    assert (
        len(torch.load(out / "checkpoint.pth", weights_only=True)["history"]) == 1
    )  # epoch 1's, untouched
    assert len(metrics(out)) == 1 and not (out / "adapters.pth").exists()


def test_a_run_states_its_recipe_and_records_the_values_it_used(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        run_train(
            *fgvc_cars(tmp_path, 16),
            "--epochs",
            "1",
            "--workers",
            "0",
            "--lr",
            "0.002",
            "--out",
            out,
        )
        == 0
    )
    header = capsys.readouterr().out.splitlines()[0]
    assert "FGVC cars (FGVC_ARC_train.py) recipe" in header
    assert "lr 0.002 (command line)" in header and "weight_decay 0.05 (recipe)" in header
    assert "vit_dropout 0.1 (recipe)" in header and "adapter_dropout 0.0 (recipe)" in header
    for name in ("checkpoint.pth", "adapters.pth"):
        saved = torch.load(out / name, weights_only=True)["config"]
        assert (
            saved["lr"],
            saved["weight_decay"],
            saved["vit_dropout"],
            saved["adapter_dropout"],
        ) == (0.002, 0.05, 0.1, 0)


def test_a_short_run_shortens_the_default_warmup(tmp_path, capsys):
    assert (
        run_train(*quick_run_args(tmp_path / "out", warmup_epochs=None)) == 0
    )  # --epochs 1, warm-up 10 by default
    assert "warmup_epochs 0 (shortened to a tenth of --epochs)" in capsys.readouterr().out
    fails_with_one_line(
        quick_run_args(tmp_path / "other", warmup_epochs=1),
        capsys,
        "--warmup-epochs 1 must be less than",
    )


def test_a_long_cpu_run_says_so_after_its_first_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "LONG_RUN_S", 0)  # every run is long
    assert run_train(*TINY_RUN, "--out", tmp_path / "run") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "s a step" in line)
    assert (
        "for the 26 steps to go" in line and "--model vit_t16" in line and "--device cuda" in line
    )


def test_finish_sends_only_the_fold_check_images_to_the_device(tmp_path, monkeypatch):
    made = []

    class Counting(data.Loader):
        def __init__(self, split, device):
            made.append(len(split))
            super().__init__(split, device)

    monkeypatch.setattr(data, "Loader", Counting)
    assert (
        run_train(*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--out", tmp_path / "run")
        == 0
    )
    assert made == [
        500,
        200,
    ]  # the training and test splits, once each: the fold check sends its 64 images alone


def test_the_official_swin_placement_trains_and_keeps_its_adapters_unfolded(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(
        train.MODELS,
        "swin_t",
        lambda **kw: swin.SwinTransformer(16, (2, 2), (1, 2), window=4, **kw),
    )
    out, args = (
        tmp_path / "run",
        [
            "--data",
            "synthetic",
            "--model",
            "swin_t",
            "--weights",
            "none",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--workers",
            "0",
        ],
    )
    assert run_train(*args, "--swin-ffn-adapter", "residual", "--out", out) == 0
    printed = capsys.readouterr().out
    assert (
        "adapters not folded: with --swin-ffn-adapter residual" in printed
        and "MISMATCH" not in printed
    )
    assert (out / "adapters.pth").exists() and not (out / "folded.pth").exists()
    assert (
        torch.load(out / "adapters.pth", weights_only=True)["config"]["swin_ffn_adapter"]
        == "residual"
    )
    assert run_train("--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0") == 0
    assert f"test accuracy {metrics(out)[-1]['test_acc']:.2f}%" in capsys.readouterr().out
    assert (
        run_train("--resume", out, "--workers", "0") == 0
        and "has finished" in capsys.readouterr().out
    )
    fails_with_one_line(
        [*TINY_RUN, "--swin-ffn-adapter", "residual"],
        capsys,
        "--swin-ffn-adapter does not apply to vit_t16",
    )


# ---------------------------------------------------------------------------------------------------
# Resume and signals (runs.py): Ctrl-C and SIGTERM, bitwise resumes, extensions, checkpoints, metrics.jsonl


def test_an_interrupted_run_resumes_to_the_same_weights(
    synthetic_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        # 16 steps an epoch, each asking the flag, and one more question at the end of the epoch
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(17 + 5))
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGINT
    error = capsys.readouterr().err
    assert "stopped by SIGINT after 1 epoch(s)" in error and f"--resume {out}" in error
    assert len(metrics(out)) == 1  # epoch 2 was cut at step 5: it runs again, whole, when resumed
    assert run_train(*TINY_RUN, "--out", out, "--resume", out) == 0
    straight, resumed = trained(synthetic_run / "adapters.pth"), trained(out / "adapters.pth")
    assert straight.keys() == resumed.keys() and all(
        torch.equal(straight[k], resumed[k]) for k in straight
    )
    assert metrics(out)[-1]["loss"] == metrics(synthetic_run)[-1]["loss"]


def test_an_fgvc_run_with_random_crops_learns_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    # FGVC trains on random crops of images decoded once; each crop depends on (epoch, image) alone, so a
    # resumed run sees the same crops.
    args = [*fgvc_cars(tmp_path, 48), "--epochs", "3", "--workers", "2"]
    assert run_train(*args, "--out", tmp_path / "straight") == 0
    history = metrics(tmp_path / "straight")
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["test_acc"] == 100.0
    with monkeypatch.context() as patch:
        patch.setattr(
            runs.StopFlag, "is_set", stop_at_call(7 + 3)
        )  # 6 steps an epoch: epoch 2, step 3
        assert run_train(*args, "--out", tmp_path / "cut") == 128 + signal.SIGINT
    # the rule: a stop mid-epoch keeps the last finished epoch, and the epoch in progress runs again
    assert "stopped by SIGINT after 1 epoch(s)" in capsys.readouterr().err
    assert len(torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["history"]) == 1
    assert run_train(*args, "--out", tmp_path / "cut", "--resume", tmp_path / "cut") == 0
    straight, resumed = (
        trained(tmp_path / "straight" / "adapters.pth"),
        trained(tmp_path / "cut" / "adapters.pth"),
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sigterm_stops_saves_and_says_how_to_resume(synthetic_run, tmp_path):
    out = tmp_path / "term"
    process = subprocess.Popen(
        [sys.executable, "train.py", *TINY_RUN, "--out", str(out)],
        cwd=HERE,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists() and time.time() < deadline:  # epoch 1 is done
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert run_train(*TINY_RUN, "--out", out, "--resume", out) == 0
    straight, resumed = trained(synthetic_run / "adapters.pth"), trained(out / "adapters.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_stop_in_the_first_epoch_says_to_start_again_not_to_resume(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setattr(runs.StopFlag, "is_set", stop_at_call(3))
        assert run_train(*TINY_RUN, "--out", tmp_path / "run") == 128 + signal.SIGINT
    error = capsys.readouterr().err
    assert "No epoch had finished" in error and "--resume" not in error


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(
        '{"epoch": 1, "loss": 2.3}\n'
    )  # what an older version left behind
    fails_with_one_line(
        quick_run_args(resume=out), capsys, "--resume", out, "no checkpoint.pth", "without --resume"
    )
    assert run_train(*quick_run_args(out)) == 0  # the same command again: it runs
    assert [m["epoch"] for m in metrics(out)] == [1] and "loss" in metrics(out)[0]


def test_metrics_have_one_line_per_epoch_after_a_kill_between_log_and_checkpoint(
    tmp_path, monkeypatch
):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(
            runs.StopFlag, "is_set", stop_at_call(17)
        )  # the question after epoch 1: stop there
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGINT
    with open(
        out / "metrics.jsonl", "a"
    ) as f:  # as if killed after logging epoch 2, before its checkpoint
        f.write(json.dumps({"epoch": 2, "loss": 9.9}) + "\n")
    assert run_train(*TINY_RUN, "--resume", out) == 0
    assert [m["epoch"] for m in metrics(out)] == [1, 2] and metrics(out)[1]["loss"] != 9.9


def test_checkpoints_are_skipped_while_the_last_one_costs_over_a_tenth_of_the_time_since(
    tmp_path, monkeypatch
):
    clock, written = [0.0], []
    monkeypatch.setattr(runs.time, "time", lambda: clock[0])

    def save_checkpoint(run):  # as --method full on a large model: 2 s a checkpoint
        clock[0] += 2.0
        written.append(len(run.history))

    monkeypatch.setattr(runs, "save_checkpoint", save_checkpoint)
    run = runs.Run(
        runs.Context(torch.device("cpu"), workers=0),
        SimpleNamespace(epochs=30),
        str(tmp_path),
        None,
        None,
        history=[],
    )
    checkpoints = runs.Checkpoints(run)
    for epoch in range(30):  # epochs of 1 s, as DTD on ViT-B on a fast GPU
        clock[0] += 1.0
        run.history.append({"epoch": epoch + 1})
        checkpoints.after_epoch(stopping=epoch + 1 == 13)
        assert len(metrics(tmp_path)) == epoch + 1  # metrics.jsonl: every epoch
    # after epoch 1 (it took 2 s), next once 20 s have passed; on the stop after epoch 13; after the last
    assert written == [1, 13, 30] and checkpoints.epochs_saved == 30


def test_a_full_disk_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    save = torch.save

    def full_disk(obj, path, *a, **k):
        if "config" in obj and len(obj.get("history", [])) == 2:
            raise OSError(28, "No space left on device")
        return save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    fails_with_one_line(
        TINY_RUN + ["--out", out], capsys, out / "checkpoint.pth", "No space left", "intact"
    )
    assert len(torch.load(out / "checkpoint.pth", weights_only=True)["history"]) == 1
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "metrics.jsonl"]  # no .tmp left behind


def test_a_ctrl_c_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(obj, path, *args, **kwargs):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not turned into a UserError: the stop goes on
        runs.save_atomic({"history": []}, str(tmp_path / "checkpoint.pth"))
    assert os.listdir(tmp_path) == []


def test_a_finished_run_is_extended_by_more_epochs(synthetic_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    before = file_hashes(out)
    assert run_train("--resume", out, "--workers", "0") == 0  # nothing to do: nothing written
    assert "has finished its 2 epochs" in capsys.readouterr().out and file_hashes(out) == before
    fails_with_one_line(
        ["--resume", out, "--epochs", "1"], capsys, "would shorten it; a run can only be extended"
    )
    assert run_train("--resume", out, "--epochs", "3", "--workers", "0") == 0
    assert "recomputed for 3 epochs" in capsys.readouterr().out
    history = metrics(out)
    assert [m["epoch"] for m in history] == [1, 2, 3] and "extended from 2 to 3" in history[1][
        "schedule"
    ]
    assert torch.load(out / "adapters.pth", weights_only=True)["config"]["epochs"] == 3
    assert (
        history[2]["lr"] < history[1]["lr"]
    )  # the new epoch's schedule: after the same cosine, near its end


def test_a_finished_run_is_never_overwritten_and_finishes_again_when_folded_pth_is_lost(
    synthetic_run, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    (out / "checkpoint.pth").unlink()  # a user saving space after a run
    fails_with_one_line([*TINY_RUN, "--out", out], capsys, "already holds a run")
    shutil.copy(synthetic_run / "checkpoint.pth", out / "checkpoint.pth")
    (out / "folded.pth").unlink()  # a run stopped while folding
    assert run_train("--resume", out, "--workers", "0") == 0
    plain = vit.vit_t16(num_classes=10, img_size=16)
    plain.load_state_dict(trained(out / "folded.pth"), strict=True)


def test_resume_keeps_the_run_s_own_weights_when_they_move(
    weight_files, tmp_path, monkeypatch, capsys
):
    weights, out = tmp_path / "w.npz", tmp_path / "run"
    shutil.copy(weight_files["vit_t16.npz"], weights)
    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "empty_hub")
    )  # --weights auto would download other weights
    with monkeypatch.context() as patch:
        patch.setattr(
            runs.StopFlag, "is_set", stop_at_call(17)
        )  # the question after epoch 1 of 2: stop there
        assert run_train(*quick_run_args(out, weights=weights, epochs=2)) == 128 + signal.SIGINT
    fails_with_one_line(
        ["--resume", out, "--workers", "0", "--weights", "auto"],
        capsys,
        "auto here",
        "the run's own weights",
    )
    assert not (tmp_path / "empty_hub").exists()  # refused before any download
    shutil.move(weights, tmp_path / "moved.npz")
    fails_with_one_line(
        ["--resume", out, "--workers", "0"], capsys, weights, "not there now", "--weights"
    )
    assert run_train("--resume", out, "--workers", "0", "--weights", tmp_path / "moved.npz") == 0
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    os.remove(
        tmp_path / "moved.npz"
    )  # a finished run needs no weights to be resumed: it says it is done
    assert run_train("--resume", out, "--workers", "0") == 0
    assert "has finished its 2 epochs" in capsys.readouterr().out


def test_eval_only_finds_moved_weights_and_data_from_anywhere(
    weight_files, tmp_path, monkeypatch, capsys
):
    weights, out = tmp_path / "w.npz", tmp_path / "run"
    shutil.copy(weight_files["vit_t16.npz"], weights)
    write_vtab_with_broken_images(tmp_path / "data", GOOD_IMAGES, GOOD_IMAGES)
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert run_train(*quick_run_args("run", data="eurosat", data_dir="data", weights="w.npz")) == 0
    accuracy = metrics(out)[-1]["test_acc"]
    (tmp_path / "moved").mkdir()
    shutil.move(weights, tmp_path / "moved" / "w.npz")
    monkeypatch.chdir(tmp_path / "moved")  # elsewhere
    fails_with_one_line(
        ["--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0"],
        capsys,
        weights,
        "not there now",
        "--weights",
    )
    fails_with_one_line(
        [
            "--eval-only",
            "--checkpoint",
            out / "adapters.pth",
            "--workers",
            "0",
            "--weights",
            weight_files["vit_s16.npz"],
        ],
        capsys,
        "--weights",
        "give the run's own weights",
    )
    capsys.readouterr()
    assert (
        run_train(
            "--eval-only",
            "--checkpoint",
            out / "adapters.pth",
            "--workers",
            "0",
            "--weights",
            "w.npz",
        )
        == 0
    )
    assert f"test accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_a_run_is_finished_until_it_is_continued_and_when_it_folded_where_it_could(tmp_path):
    record = {
        "epochs": 2,
        "method": "arc",
        "model": "swin_t",
        "swin_ffn_adapter": "residual",
    }  # an older record:
    runs.save_atomic(
        {"config": {"weights": "none"}, "history": [{}, {}]}, str(tmp_path / "checkpoint.pth")
    )  # no
    os.utime(
        tmp_path / "checkpoint.pth", (time.time() + 60,) * 2
    )  # "folded"; dates do not matter (a copied run)
    runs.save_atomic({"config": record}, str(tmp_path / "adapters.pth"))
    assert (
        runs.finished(tmp_path) == record and runs.finished(tmp_path, 2) == record
    )  # unfoldable: no folded.pth
    assert runs.finished(tmp_path, 3) is None  # more epochs: it is to be extended
    runs.save_atomic(
        {"config": {**record, "swin_ffn_adapter": "norm2"}}, str(tmp_path / "adapters.pth")
    )
    assert runs.finished(tmp_path) is None  # foldable, and no folded.pth: it stopped while folding
    (tmp_path / "folded.pth").write_bytes(b"")
    assert runs.finished(tmp_path)["epochs"] == 2
    runs.save_atomic(
        {"config": {"weights": "none"}, "history": [{}] * 3}, str(tmp_path / "checkpoint.pth")
    )
    assert runs.finished(tmp_path) is None  # a checkpoint of a third epoch: it was continued since
    (tmp_path / "checkpoint.pth").write_text("not a checkpoint")
    assert (
        runs.finished(tmp_path) is None
    )  # unreadable: not finished, for --resume to say what is wrong with it
    os.remove(tmp_path / "checkpoint.pth")
    assert runs.finished(tmp_path)["epochs"] == 2  # deleted once the run finished


def test_a_stop_says_how_many_epochs_since_the_last_checkpoint_will_run_again():
    assert str(runs.Interrupted(signal.SIGINT, 5, 5)) == "stopped by SIGINT after 5 epoch(s)"
    assert str(runs.Interrupted(signal.SIGTERM, 7, 4)) == (
        "stopped by SIGTERM after 7 epoch(s) (3 since the last checkpoint will run again)"
    )


# ---------------------------------------------------------------------------------------------------
# Several processes: torchrun on the CPU trains what one process trains


def torchrun(args, nproc=2):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "train.py",
            *map(str, args),
            "--device",
            "cpu",
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_machine_computes_once_and_hands_the_result_to_its_other_processes(tmp_path):
    # runs.node_once under torchrun (2 gloo processes): the first computes and hands its result over through a
    # private file; when the file cannot be written (a full TMPDIR), the other computes for itself; no file is left
    script, scratch = tmp_path / "once.py", tmp_path / "tmp"
    scratch.mkdir()
    script.write_text(f"""import glob, os, sys, torch
sys.path.insert(0, {HERE!r})
import runs
ctx, calls = runs.setup_distributed("cpu", 0), []
first = runs.node_once(ctx, lambda: calls.append("first") or torch.arange(5))
save = torch.save
def full(*args, **kw):
    raise OSError(28, "No space left on device")
torch.save = full
second = runs.node_once(ctx, lambda: calls.append("second") or "computed")
torch.save = save
left = [name for name in os.listdir({str(scratch)!r}) if name.startswith("arc-")]
with open(os.path.join({str(tmp_path)!r}, f"rank{{ctx.rank}}.txt"), "w") as f:
    f.write(f"{{first.tolist()}} {{second}} {{calls}} {{left}}")
torch.distributed.destroy_process_group()
""")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "rank0.txt").read_text() == "[0, 1, 2, 3, 4] computed ['first', 'second'] []"
    assert (tmp_path / "rank1.txt").read_text() == "[0, 1, 2, 3, 4] computed ['second'] []"


def test_two_processes_train_the_same_weights_as_one_even_when_one_gets_an_empty_share(tmp_path):
    # an FGVC set: 33 images in batches of 8, so the last batch has one image and the second process gets none
    args = [
        *fgvc_cars(tmp_path, 33),
        "--epochs",
        "2",
        "--adapter-dropout",
        "0",
        "--vit-dropout",
        "0",
        "--workers",
        "1",
    ]
    assert run_train(*args, "--out", tmp_path / "one") == 0
    result = torchrun([*args, "--out", tmp_path / "two"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   2/2") == 1  # rank 0 alone logs
    one, two = (
        trained(tmp_path / "one" / "adapters.pth"),
        trained(tmp_path / "two" / "adapters.pth"),
    )
    # float tolerance: sums over two processes round differently, and Adam scales up tiny gradients
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    assert metrics(tmp_path / "two")[-1]["test_acc"] == metrics(tmp_path / "one")[-1]["test_acc"]


def test_two_processes_draw_their_own_dropout_masks_and_a_stopped_run_resumes_bitwise(tmp_path):
    # torchrun runs a script that records the first dropout mask each process draws in training and, with STOP_AT,
    # makes train.py's stop flag fire in epoch 2 on both processes. Adapter dropout: the recipe's 0.1
    script = tmp_path / "recording.py"
    script.write_text(f"""import os, signal, sys, torch
sys.path.insert(0, {HERE!r})
import runs, train
out, stop_at = sys.argv[sys.argv.index("--out") + 1], int(os.environ.get("STOP_AT", 0))
dropout, calls = torch.nn.Dropout.forward, []
def recording(self, x):
    y = dropout(self, x)
    mask = os.path.join(out, "mask" + os.environ["RANK"] + ".pt")
    if self.training and self.p > 0 and x.ne(0).any() and not os.path.exists(mask):  # (c_att starts at 0)
        torch.save((y == 0) & (x != 0), mask)
    return y
def is_set(self, group):  # 16 steps an epoch, each asking, and one question after the epoch
    calls.append(1)
    self.signum = signal.SIGTERM if len(calls) == stop_at else self.signum
    return bool(self.signum)
torch.nn.Dropout.forward = recording
if stop_at:
    runs.StopFlag.is_set = is_set
train.main()
""")
    run = lambda out, target, *extra, stop_at=0: subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            target,
            *map(str, TINY_RUN),
            "--out",
            str(out),
            "--device",
            "cpu",
            *extra,
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "STOP_AT": str(stop_at)},
    )
    straight = run(tmp_path / "straight", str(script))
    assert straight.returncode == 0, straight.stderr[-2000:]
    first, second = (torch.load(tmp_path / "straight" / f"mask{rank}.pt") for rank in (0, 1))
    assert (
        first.shape == second.shape and first.any() and not torch.equal(first, second)
    )  # each its own masks
    stopped = run(tmp_path / "cut", str(script), stop_at=17 + 5)
    assert stopped.returncode != 0 and "stopped by SIGTERM after 1 epoch(s)" in stopped.stderr, (
        stopped.stderr[-2000:]
    )
    resumed = run(tmp_path / "cut", "train.py", "--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one, two = (
        trained(tmp_path / "straight" / "adapters.pth"),
        trained(tmp_path / "cut" / "adapters.pth"),
    )
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)  # bitwise
    assert [m["epoch"] for m in metrics(tmp_path / "cut")] == [1, 2]
