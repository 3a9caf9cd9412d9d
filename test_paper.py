"""Tests of suites, the authors' recipes and the paper's tables (paper.py)."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import data
import paper
import swin
import train
from conftest import (
    SUITE,
    TINY_RUN,
    fails_with_one_line,
    file_hashes,
    metrics,
    run_train,
    signal_at_step,
    write_image_folder,
)

# --------------------------------------------------------------------------------------------------
# Suites and the paper's recipes and tables (paper.py)


def write_vtab_by_brightness(data_dir, task, classes, n_train=12, n_test=8):
    """A tiny VTAB-1k task folder; the class is in the brightness, so a head learns it."""
    folder = data_dir / "vtab-1k" / task
    for split, n in (("train800val200", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            image = folder / "images" / split / f"{i:06d}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 + 60 * (i % classes), np.uint8)).save(image)
            lines.append(f"images/{split}/{i:06d}.png {i % classes}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_the_recipe_table_gives_each_task_the_authors_settings_and_the_command_line_wins():
    cfg, sources, name = paper.settings({"data": "cub"})
    assert (cfg.lr, cfg.weight_decay, cfg.adapter_dropout, cfg.vit_dropout) == (
        1e-3,
        0.05,
        0.1,
        0.1,
    )
    assert "FGVC_ARC_train.py" in name and sources["lr"] == sources["vit_dropout"] == "recipe"
    cfg, sources, _ = paper.settings({"data": "cub", "lr": 0.002})
    assert (cfg.lr, sources["lr"], cfg.weight_decay, sources["weight_decay"]) == (
        0.002,
        "command line",
        0.05,
        "recipe",
    )
    cfg, _, _ = paper.settings({"data": "dtd"})  # VTAB-1k on the ViT: the defaults
    assert (cfg.lr, cfg.weight_decay, cfg.adapter_dropout, cfg.vit_dropout, cfg.drop_path) == (
        1e-2,
        0,
        0.1,
        0,
        0,
    )
    cfg, sources, _ = paper.settings(
        {"data": "dtd", "model": "swin_b"}
    )  # what train_ARC_swin.py really ran
    assert (cfg.lr, cfg.weight_decay, cfg.adapter_dropout, cfg.drop_path) == (5e-3, 5e-2, 0.5, 0.1)
    assert (cfg.vit_dropout, sources["vit_dropout"]) == (0.0, "n/a")
    assert paper.settings({"data": "cifar", "model": "swin_b"})[0].weight_decay == 1e-2
    # the options reach the model: dropout p=0.1 in the ViT for CUB, drop-path in Swin
    vit_for_cub = train.build_model(paper.settings({"data": "cub", "model": "vit_t16"})[0], 200)
    assert sorted({m.p for m in vit_for_cub.modules() if isinstance(m, torch.nn.Dropout)}) == [0.1]
    with pytest.raises(train.UserError, match="--drop-path does not apply to vit_b16"):
        paper.settings({"data": "dtd", "drop_path": 0.1})


def test_a_suite_runs_its_tasks_resumes_and_reports_the_paper_s_means(
    tmp_path, monkeypatch, capsys
):
    data_dir, out = tmp_path / "data", tmp_path / "suite"
    tasks = [
        "dtd",
        "eurosat",
        "kitti",
    ]  # one task of each VTAB-1k group: natural, specialized, structured
    for task, classes in zip(tasks, (3, 3, 2), strict=True):
        write_vtab_by_brightness(data_dir, task, classes)
    args = ["--data", ",".join(tasks), "--data-dir", data_dir, *SUITE, "--out", out]
    with (
        monkeypatch.context() as patch
    ):  # Ctrl-C in the second task's first epoch (each has 1 step an epoch)
        patch.setattr(train, "lr_at", signal_at_step(2 + 1))
        assert run_train(*args) == 128 + signal.SIGINT
    assert f"--resume {out}" in capsys.readouterr().err
    assert list(json.loads((out / "results.json").read_text())["tasks"]) == ["dtd"]
    first, stored = file_hashes(out / "dtd"), (out / "suite.json").read_text()
    fails_with_one_line(
        ["--resume", out, "--workers", "0", "--lr", "0.5"], capsys, "--lr 0.01 there, 0.5 here"
    )
    assert (out / "suite.json").read_text() == stored  # a refused option changes nothing
    assert run_train("--resume", out, "--workers", "0") == 0
    assert "has finished its 2 epochs" in capsys.readouterr().out
    assert file_hashes(out / "dtd") == first  # finished: skipped, not trained again
    results = json.loads((out / "results.json").read_text())
    finals = {task: metrics(out / task)[-1]["test_acc"] for task in tasks}
    assert {task: r["final"] for task, r in results["tasks"].items()} == finals
    assert results["groups"] == {
        "natural": finals["dtd"],
        "specialized": finals["eurosat"],
        "structured": finals["kitti"],
    }
    assert results["mean"] == pytest.approx(sum(finals.values()) / 3, abs=0.006)
    assert "paper" not in results  # vit_t16 is not the paper's model
    table = (out / "results.md").read_text()
    assert (
        "| kitti |" in table
        and "**structured mean** (1 tasks)" in table
        and "selected on the test set" in table
    )
    os.remove(
        out / "dtd" / "checkpoint.pth"
    )  # a finished task's checkpoint deleted (1 GB for full fine-tuning)
    assert run_train("--resume", out, "--workers", "0") == 0
    assert json.loads((out / "results.json").read_text()) == results


def test_a_suite_with_missing_data_stops_before_training_with_one_line(tmp_path, capsys):
    data_dir, out = tmp_path / "data", tmp_path / "suite"
    write_vtab_by_brightness(data_dir, "eurosat", 3)
    fails_with_one_line(
        ["--data", "cifar,eurosat,kitti", "--data-dir", data_dir, *SUITE, "--out", out],
        capsys,
        "2 of the 3 tasks",
        f"cifar ({data_dir / 'vtab-1k' / 'cifar' / 'train800val200.txt'} is missing)",
        "kitti",
        "--data eurosat",
    )
    assert not out.exists()


def test_a_folder_in_a_task_list_keeps_the_runs_files_out_of_it(tmp_path):
    images, out = write_image_folder(tmp_path / "my_images"), tmp_path / "suite"
    assert run_train("--data", f"{images},synthetic", *SUITE, "--out", out) == 0
    assert sorted(os.listdir(images)) == [
        "test",
        "train",
    ]  # nothing written among the user's images
    assert (out / "my_images" / "folded.pth").exists() and (
        out / "synthetic" / "folded.pth"
    ).exists()
    assert set(json.loads((out / "results.json").read_text())["tasks"]) == {
        "my_images",
        "synthetic",
    }


def test_a_suite_json_in_the_current_folder_is_not_mistaken_for_a_suite(tmp_path, monkeypatch):
    (tmp_path / "suite.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert (
        run_train(*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--out", tmp_path / "run")
        == 0
    )


def test_a_suite_of_unfoldable_runs_resumes_finished_and_keeps_its_model_in_the_table(
    tmp_path, monkeypatch, capsys
):
    # the official Swin placement writes no folded.pth: its finished tasks must not ask for their
    # data again, and the table names the suite's model and method, also after a resume that repeats
    # none of them
    monkeypatch.setitem(
        train.MODELS,
        "swin_t",
        lambda **kw: swin.SwinTransformer(16, (2, 2), (1, 2), window=4, **kw),
    )
    images, out = write_image_folder(tmp_path / "pets"), tmp_path / "suite"
    args = [
        "--data",
        f"synthetic,{images}",
        "--model",
        "swin_t",
        "--swin-ffn-adapter",
        "residual",
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
        "--out",
        out,
    ]
    assert run_train(*args) == 0 and not (out / "pets" / "folded.pth").exists()
    shutil.rmtree(images)  # its data gone: a finished task needs none
    assert run_train("--resume", out, "--workers", "0") == 0
    assert capsys.readouterr().out.count("has finished its 1 epochs") == 2
    assert (out / "results.md").read_text().startswith("# ARC: swin_t, arc\n")
    before = file_hashes(out / "synthetic")
    # extending the suite trains every task again: one line about the missing data first, and
    # nothing trained
    fails_with_one_line(
        ["--resume", out, "--epochs", "2", "--workers", "0"],
        capsys,
        "no data for 1 of the 2 tasks",
        "pets",
    )
    assert file_hashes(out / "synthetic") == before


def test_results_give_the_paper_s_group_means_and_overall_mean(tmp_path):
    # the paper's own per-task figures must give back its Table 1 means: 81.6, 85.8, 60.0 and 73.4
    # (the mean of the 19 tasks, not of the three groups)
    results = {
        task: [
            {
                "final": paper.ACCURACY[task],
                "best": paper.ACCURACY[task],
                "trainable": 1,
                "seconds": {"training": 1, "testing": 1},
                "seed": 42,
            }
        ]
        for task in data.SUITES["vtab-1k"]
    }
    paper.write_results(str(tmp_path), results, "vit_b16", "arc")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert {g: round(m, 1) for g, m in summary["groups"].items()} == {
        "natural": 81.6,
        "specialized": 85.8,
        "structured": 60.0,
    }
    assert round(summary["mean"], 1) == 73.4 and summary["paper"]["mean"] == summary["mean"]
    assert "| cifar | 72.20 | 72.20 | 72.2 | +0.00 |" in (tmp_path / "results.md").read_text()


def test_a_suite_of_two_seeds_resumes_seed_by_seed_and_summarises_them(
    tmp_path, monkeypatch, capsys
):
    data_dir, out = tmp_path / "data", tmp_path / "suite"
    for task, classes in (("dtd", 3), ("kitti", 2)):
        write_vtab_by_brightness(data_dir, task, classes)
    args = ["--data", "dtd,kitti", "--seeds", "2", "--data-dir", data_dir, *SUITE, "--out", out]
    with monkeypatch.context() as patch:  # 1 step an epoch, 2 epochs: kitti's first seed, epoch 2
        patch.setattr(train, "lr_at", signal_at_step(2 + 2 + 2))
        assert run_train(*args) == 128 + signal.SIGINT
    assert f"--resume {out}" in capsys.readouterr().err
    assert sorted(os.listdir(out / "dtd")) == ["seed42", "seed43"]
    assert [m["epoch"] for m in metrics(out / "kitti" / "seed42")] == [1]
    assert run_train("--resume", out, "--workers", "0") == 0
    results = json.loads((out / "results.json").read_text())
    finals = {}
    for task in ("dtd", "kitti"):
        seeds = [
            torch.load(out / task / f"seed{s}" / "adapters.pth")["config"]["seed"] for s in (42, 43)
        ]
        assert seeds == [42, 43]
        finals[task] = [metrics(out / task / f"seed{s}")[-1]["test_acc"] for s in (42, 43)]
        assert results["tasks"][task]["seeds"] == [42, 43]
        assert results["tasks"][task]["final"] == pytest.approx(np.mean(finals[task]), abs=0.006)
        assert results["tasks"][task]["final_std"] == pytest.approx(np.std(finals[task]), abs=0.006)
    assert results["mean"] == pytest.approx(
        np.mean([np.mean(f) for f in finals.values()]), abs=0.01
    )


def test_one_task_with_three_seeds_gets_the_same_summary(tmp_path):
    out = tmp_path / "run"
    assert (
        run_train(
            *TINY_RUN,
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--seeds",
            "3",
            "--seed",
            "7",
            "--out",
            out,
        )
        == 0
    )
    assert sorted(os.listdir(out)) == [
        ".lock",
        "results.json",
        "results.md",
        "seed7",
        "seed8",
        "seed9",
        "suite.json",
    ]
    results = json.loads((out / "results.json").read_text())
    finals = [metrics(out / f"seed{s}")[-1]["test_acc"] for s in (7, 8, 9)]
    assert results["tasks"]["synthetic"]["seeds"] == [7, 8, 9]
    assert results["tasks"]["synthetic"]["final"] == pytest.approx(np.mean(finals), abs=0.006)
    assert len({metrics(out / f"seed{s}")[-1]["loss"] for s in (7, 8, 9)}) == 3  # three runs
