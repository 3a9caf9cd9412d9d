"""Tests of training: the step and the loop, resume and signals, checkpoints, and torchrun on the
CPU."""

import json
import os
import shlex
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
    signal_at_step,
    tiny_vit,
    trained,
    write_dtd_release,
    write_image_folder,
    write_vtab_with_broken_images,
)

# --------------------------------------------------------------------------------------------------
# The step and the loop (train.py): learning runs, device reads, bf16, batch shares, NaN, recipes,
# the fold check


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
    # per epoch: the loss and the accuracy; at the end: the folding check. A read per step (a host
    # sync on a GPU) would add 32.
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


@pytest.mark.parametrize("step, kept", [(16 + 7, "checkpoint.pth holds epoch 1"), (3, "no epoch")])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys, step, kept
):
    cross_entropy, calls = torch.nn.functional.cross_entropy, []

    def diverging(*args, **kwargs):  # a step's loss, made nan at the given step
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == step else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    out = tmp_path / "nan"
    epoch = 1 + (step - 1) // 16
    where = f"nan or infinite at epoch {epoch}, step {1 + (step - 1) % 16}"
    fails_with_one_line([*TINY_RUN, "--out", out], capsys, where, kept)
    if epoch == 2:  # epoch 1's checkpoint, untouched, named in the message
        assert len(torch.load(out / "checkpoint.pth", weights_only=True)["history"]) == 1
        assert len(metrics(out)) == 1 and not (out / "adapters.pth").exists()
    else:  # nothing was saved, and the folder made for the run is gone again
        assert not out.exists()


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


def run_on_a_terminal(args, tmp_path):
    """train.py in its own process, its output on a pseudo-terminal: what the terminal received."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "train.py", *map(str, args)],
        cwd=HERE,
        stdout=follower,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    os.close(follower)
    received = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process has ended and closed the terminal
            break
        if not chunk:
            break
        received += chunk
    process.wait(timeout=120)
    os.close(leader)
    return process.returncode, received.decode()


def test_the_progress_line_shows_on_a_terminal_and_never_in_a_file(tmp_path, capsys):
    args = [*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0"]
    code, shown = run_on_a_terminal([*args, "--out", tmp_path / "tty"], tmp_path)
    assert code == 0, shown
    assert "\r  step 1/16 " in shown and "\r  step 16/16 " in shown and "img/s" in shown
    assert "to go" in shown and "\r\x1b[K" + "epoch   1/1" in shown.replace("\r\n", "\n")
    assert run_train(*args, "--out", tmp_path / "file") == 0  # captured: not a terminal
    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "step 1/16" not in printed and "\r" not in printed


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


# --------------------------------------------------------------------------------------------------
# Resume and signals (runs.py): Ctrl-C and SIGTERM, bitwise resumes, extensions, checkpoints,
# metrics.jsonl


def test_an_interrupted_run_resumes_to_the_same_weights(
    synthetic_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:  # 16 steps an epoch
        patch.setattr(train, "lr_at", signal_at_step(16 + 5))  # epoch 2, step 5
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGINT
    error = capsys.readouterr().err
    assert "stopped by SIGINT" in error and f"--resume {out}" in error
    assert len(metrics(out)) == 1  # epoch 2 was cut at step 5: it runs again, whole, when resumed
    assert run_train(*TINY_RUN, "--out", out, "--resume", out) == 0
    straight, resumed = trained(synthetic_run / "adapters.pth"), trained(out / "adapters.pth")
    assert straight.keys() == resumed.keys() and all(
        torch.equal(straight[k], resumed[k]) for k in straight
    )
    assert metrics(out)[-1]["loss"] == metrics(synthetic_run)[-1]["loss"]


def test_an_fgvc_run_with_random_crops_learns_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    # FGVC trains on random crops of images decoded once; each crop depends on (epoch, image) alone,
    # so a resumed run sees the same crops. --precision fp32: the bitwise resume in float32 (the
    # other resume tests run the default, bf16 here)
    args = [*fgvc_cars(tmp_path, 48), "--epochs", "3", "--workers", "2", "--precision", "fp32"]
    assert run_train(*args, "--out", tmp_path / "straight") == 0
    history = metrics(tmp_path / "straight")
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["test_acc"] == 100.0
    with monkeypatch.context() as patch:
        patch.setattr(train, "lr_at", signal_at_step(6 + 3))  # 6 steps an epoch: epoch 2, step 3
        assert run_train(*args, "--out", tmp_path / "cut") == 128 + signal.SIGINT
    # the rule: a stop mid-epoch keeps the last finished epoch, and the epoch in progress runs again
    assert "stopped by SIGINT" in capsys.readouterr().err
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
        patch.setattr(train, "lr_at", signal_at_step(3))
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
        patch.setattr(train, "lr_at", signal_at_step(17))  # epoch 2's first step: epoch 1 saved
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGINT
    with open(
        out / "metrics.jsonl", "a"
    ) as f:  # as if killed after logging epoch 2, before its checkpoint
        f.write(json.dumps({"epoch": 2, "loss": 9.9}) + "\n")
    assert run_train(*TINY_RUN, "--resume", out) == 0
    assert [m["epoch"] for m in metrics(out)] == [1, 2] and metrics(out)[1]["loss"] != 9.9


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    # the second checkpoint.pth is written to /dev/full, which fails every write as a full disk does
    out = tmp_path / "run"
    made = []
    mkstemp = runs.tempfile.mkstemp

    def on_a_full_disk(suffix, prefix, folder):
        handle, path = mkstemp(suffix, prefix, folder)
        made.append(prefix)
        if made.count("checkpoint.pth.") == 2:
            os.dup2(os.open("/dev/full", os.O_WRONLY), handle)
        return handle, path

    monkeypatch.setattr(runs.tempfile, "mkstemp", on_a_full_disk)
    fails_with_one_line(
        TINY_RUN + ["--out", out], capsys, out / "checkpoint.pth", "No space left", "intact"
    )
    assert len(torch.load(out / "checkpoint.pth", weights_only=True)["history"]) == 1
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pth", "metrics.jsonl"]  # no .tmp


def test_a_stop_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pth").write_text("the last good one")

    def interrupted(handle):  # the whole file written, the stop comes as it is flushed
        raise train.Stopped(signal.SIGTERM)

    monkeypatch.setattr(runs.os, "fsync", interrupted)
    with pytest.raises(train.Stopped):  # not turned into a UserError: the stop goes on
        runs.save_atomic({"history": []}, str(tmp_path / "checkpoint.pth"))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert (tmp_path / "checkpoint.pth").read_text() == "the last good one"


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
        patch.setattr(train, "lr_at", signal_at_step(17))  # epoch 2's first step: epoch 1 saved
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
        f"--weights {weight_files['vit_s16.npz']}",  # other weights: the loader refuses them
        "does not fit",
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
    record = {"epochs": 2, "folds": False}  # the official Swin placement: no folded.pth
    result = {"final": 50.0}
    runs.save_atomic({"history": [{}, {}]}, str(tmp_path / "checkpoint.pth"))
    runs.save_atomic({"config": record, "result": result}, str(tmp_path / "adapters.pth"))
    done = {**record, "result": result}
    assert runs.finished(tmp_path, None) == done and runs.finished(tmp_path, 2) == done
    assert runs.finished(tmp_path, 3) is None  # more epochs: it is to be extended
    runs.save_atomic(
        {"config": {**record, "folds": True}, "result": result}, str(tmp_path / "adapters.pth")
    )
    assert runs.finished(tmp_path, 2) is None  # foldable, and folded.pth lost: to be written again
    (tmp_path / "folded.pth").write_bytes(b"")
    assert runs.finished(tmp_path, 2)["epochs"] == 2


# --------------------------------------------------------------------------------------------------
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


def test_two_processes_train_the_same_weights_as_one_even_when_one_gets_an_empty_share(tmp_path):
    # an FGVC set: 33 images in batches of 8, so the last batch has one image and the second process
    # gets none
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
        "--precision",  # float32: equal to one process within float rounding, not bf16's
        "fp32",
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
    # torchrun runs a script that records the first dropout mask each process draws in training and,
    # with STOP_AT, sends SIGTERM to both processes in epoch 2. Adapter dropout: the recipe's 0.1
    script = tmp_path / "recording.py"
    script.write_text(f"""import os, signal, sys, torch
sys.path.insert(0, {HERE!r})
import train
out, stop_at = sys.argv[sys.argv.index("--out") + 1], int(os.environ.get("STOP_AT", 0))
dropout, calls = torch.nn.Dropout.forward, []
def recording(self, x):
    y = dropout(self, x)
    mask = os.path.join(out, "mask" + os.environ["RANK"] + ".pt")
    # (c_att starts at 0)
    if self.training and self.p > 0 and x.ne(0).any() and not os.path.exists(mask):
        torch.save((y == 0) & (x != 0), mask)
    return y
lr_at = train.lr_at
def signalling(*args):  # a SIGTERM to each process at the same step, as torchrun sends it to all
    calls.append(1)
    if len(calls) == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return lr_at(*args)
torch.nn.Dropout.forward = recording
train.lr_at = signalling
train.main()
""")

    def run(out, target, *extra, stop_at=0):
        return subprocess.run(
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
    stopped = run(tmp_path / "cut", str(script), stop_at=16 + 5)
    assert stopped.returncode != 0 and "stopped by SIGTERM" in stopped.stderr, stopped.stderr[
        -2000:
    ]
    resumed = run(tmp_path / "cut", "train.py", "--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one, two = (
        trained(tmp_path / "straight" / "adapters.pth"),
        trained(tmp_path / "cut" / "adapters.pth"),
    )
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)  # bitwise
    assert [m["epoch"] for m in metrics(tmp_path / "cut")] == [1, 2]


# --------------------------------------------------------------------------------------------------
# A run folder's owner, signals outside the loop, where train.py runs from


def hold_lock(folder):
    """Another process's lock on a run folder, as a running train.py holds it: a child that takes
    the lock and waits. Returns the child (kill it to let the lock go)."""
    os.makedirs(folder, exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
            os.path.join(folder, ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_run_folder_has_one_owner_and_a_killed_owner_leaves_no_lock(
    synthetic_run, tmp_path, capsys
):
    fresh, running = tmp_path / "fresh", tmp_path / "running"
    shutil.copytree(synthetic_run, running)
    os.remove(running / "adapters.pth")  # a run in its last epoch
    holders = [hold_lock(fresh), hold_lock(running)]
    try:
        fails_with_one_line([*TINY_RUN, "--out", fresh], capsys, fresh, "in use by another")
        fails_with_one_line(
            ["--resume", running, "--workers", "0"], capsys, running, "in use by another"
        )
    finally:
        for holder in holders:
            holder.kill()  # as SIGKILL or a crash ends a run: the kernel lets its lock go
            holder.wait()
    assert run_train("--resume", running, "--workers", "0") == 0
    assert run_train(*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--out", fresh) == 0


def test_saves_write_a_temporary_file_of_their_own_and_flush_it_before_the_rename(
    tmp_path, monkeypatch
):
    calls = []
    mkstemp = runs.tempfile.mkstemp
    fsync = runs.os.fsync
    replace = runs.os.replace
    monkeypatch.setattr(runs.tempfile, "mkstemp", lambda *a: calls.append("mkstemp") or mkstemp(*a))
    monkeypatch.setattr(runs.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(
        runs.os, "replace", lambda *a: calls.append(("replace", *map(str, a))) or replace(*a)
    )
    target = str(tmp_path / "checkpoint.pth")
    runs.save_atomic({"history": [1]}, target)
    runs.save_atomic("text\n", target + ".txt")
    temporaries = [call[1] for call in calls if call[0] == "replace"]
    # the file flushed before the rename, and the folder after it, so that the rename lasts too
    kinds = [call if isinstance(call, str) else call[0] for call in calls]
    assert kinds == ["mkstemp", "fsync", "replace", "fsync"] * 2
    assert len(set(temporaries)) == 2 and all(t.endswith(".tmp") for t in temporaries)
    assert torch.load(target, weights_only=True) == {"history": [1]}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint.pth.txt"]


def test_sighup_stops_a_run_as_sigterm_does(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train, "lr_at", signal_at_step(16 + 2, signal.SIGHUP))
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGHUP
    assert "stopped by SIGHUP" in capsys.readouterr().err
    assert [m["epoch"] for m in metrics(out)] == [1]
    assert run_train("--resume", out, "--workers", "0") == 0
    assert [m["epoch"] for m in metrics(out)] == [1, 2]


def test_a_stop_while_folded_pth_is_written_leaves_no_temporary_file_and_resumes(
    tmp_path, monkeypatch, capsys
):
    out, fsync = tmp_path / "run", runs.os.fsync

    def stopped_while_folding(handle):
        if any(name.startswith("folded.pth.") for name in os.listdir(out)):
            os.kill(os.getpid(), signal.SIGTERM)
        return fsync(handle)

    with monkeypatch.context() as patch:
        patch.setattr(runs.os, "fsync", stopped_while_folding)
        assert run_train(*TINY_RUN, "--out", out) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pth", "metrics.jsonl"]
    assert run_train("--resume", out, "--workers", "0") == 0  # the epochs are done: it folds
    assert (out / "folded.pth").exists() and (out / "adapters.pth").exists()


def test_sigterm_just_after_saved_leaves_a_finished_run_finished(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "train.py", *TINY_RUN, "--epochs", "1", "--warmup-epochs", "0"]
        + ["--out", str(out)],
        cwd=HERE,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in process.stdout:
        if line.startswith("saved"):
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert (out / "adapters.pth").exists()


def test_no_traceback_for_a_closed_pipe_an_ascii_terminal_or_a_long_tmpdir(tmp_path):
    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONIOENCODING": "ascii",
        "TMPDIR": str(long_tmp),
    }
    images = write_image_folder(tmp_path / "images")
    args = [*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0"]
    args[args.index("synthetic")] = str(images)
    # train.py itself keeps no file under TMPDIR (the decoding processes' sockets are data.py's)
    ran = subprocess.run(
        [
            sys.executable,
            "train.py",
            *args,
            "--out",
            str(tmp_path / "caf\u00e9 \u00e0 la cr\u00e8me"),
        ],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert "caf\\xe9" in ran.stdout  # the path, escaped for an ASCII terminal
    piped = subprocess.run(  # `| head -2`: the reader goes away, the run goes on unseen
        f"{shlex.quote(sys.executable)} train.py {shlex.join(TINY_RUN)} --epochs 1 "
        f"--warmup-epochs 0 --out {shlex.quote(str(tmp_path / 'piped'))} | head -2",
        shell=True,
        cwd=HERE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(piped.stdout.splitlines()) == 2 and piped.stderr == "", piped.stderr
    assert (tmp_path / "piped" / "adapters.pth").exists()


@pytest.mark.parametrize("what", ["a data/ folder", "a data.py"])
def test_the_project_s_modules_are_found_whatever_the_current_folder_holds(tmp_path, what):
    here = tmp_path / "here"
    (here / "data").mkdir(parents=True)  # the default --data-dir's name
    if what == "a data.py":
        (here / "data.py").write_text("raise SystemExit('the current folder data.py ran')\n")
    images = write_image_folder(tmp_path / "images")
    args = [*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--out", here / "run"]
    args[args.index("synthetic")] = images
    args[args.index("--workers") + 1] = "2"  # decoding threads, as a run has them
    ran = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), *map(str, args)],
        cwd=here,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    saved = torch.load(here / "run" / "adapters.pth", weights_only=True)["config"]
    assert saved["data_dir"] == str(here / "data")  # the default --data-dir, stored absolute


def test_a_fold_that_changes_the_logits_or_meets_nan_is_an_error_not_a_line(capsys):
    model = randomize_arc(tiny_vit(num_classes=5, arc="arc"))
    split = SimpleNamespace(images=torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8))
    assert "(they agree)" in train.fold_and_compare(model, split, torch.device("cpu"))
    broken = randomize_arc(tiny_vit(num_classes=5, arc="arc"))
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if "adapter" in n).fill_(float("nan"))
    with pytest.raises(train.UserError, match="nan or infinite"):
        train.fold_and_compare(broken, split, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# Precision: bf16 where the hardware computes it natively, the same in training and testing


@pytest.mark.parametrize(
    "device, native, expected",
    [("cpu", True, "bf16"), ("cpu", False, "fp32"), ("cuda", False, "bf16")],
)
def test_auto_precision_follows_the_hardware(monkeypatch, device, native, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    precision, why = train.auto_precision(torch.device(device))
    assert precision == expected and why.startswith("auto: ")
    cfg, sources, _ = train.paper.settings({"data": "dtd"}, None, (precision, why))
    assert (cfg.precision, sources["precision"]) == (expected, why)
    cfg, sources, _ = train.paper.settings({"data": "dtd"}, vars(cfg), ("fp32", "auto: other"))
    assert (cfg.precision, sources["precision"]) == (expected, "run")  # a resume keeps it


def test_a_bf16_cpu_step_agrees_with_the_float32_step():
    images = torch.randn(16, 3, 32, 32)
    labels = torch.arange(16) % 5
    losses, gradients = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same model twice
        model = randomize_arc(tiny_vit(num_classes=5, arc="arc"))
        with torch.no_grad():  # ARC's tensors at about a trained run's size (std 0.1)
            for name in arc.arc_state_dict(model):
                model.get_parameter(name).mul_(0.2)
        arc.mark_trainable(model)
        with train.autocast(torch.device("cpu"), precision):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        losses[precision] = loss.item()
        gradients[precision] = torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.requires_grad]
        )
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.01)
    cosine = torch.nn.functional.cosine_similarity(gradients["bf16"], gradients["fp32"], dim=0)
    assert cosine > 0.99


def test_the_precision_is_stated_first_recorded_and_kept_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--precision", "fp32"]
    assert run_train(*args, "--out", out) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "precision fp32 (command line)" in first
    assert torch.load(out / "adapters.pth", weights_only=True)["config"]["precision"] == "fp32"
    assert run_train("--resume", out, "--epochs", "2", "--workers", "0") == 0
    assert "precision fp32 (run)" in capsys.readouterr().out.splitlines()[0]
    assert run_train("--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0") == 0
    assert ", fp32: test accuracy" in capsys.readouterr().out  # testing uses it too


def test_augreg_weights_are_the_cached_augreg_file_and_only_for_vit_b16(
    tmp_path, monkeypatch, vit_b16_npz, capsys
):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    os.symlink(vit_b16_npz[0], hub / os.path.basename(vit.AUGREG_URLS["vit_b16"]))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download")
    )
    images = write_image_folder(tmp_path / "images")
    args = [*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--img-size", "32"]
    args[args.index("synthetic")] = images
    args[args.index("vit_t16")] = "vit_b16"
    args[args.index("none")] = "augreg"
    assert run_train(*args, "--out", tmp_path / "run") == 0
    assert torch.load(tmp_path / "run" / "adapters.pth")["config"]["weights"] == "augreg"
    args[args.index("vit_b16")] = "vit_t16"
    fails_with_one_line([*args, "--out", tmp_path / "t16"], capsys, "--weights augreg", "vit_b16")
