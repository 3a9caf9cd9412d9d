"""Tests of suites, the authors' recipes and the paper's tables (paper.py)."""

import json
import os
import re
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


# --------------------------------------------------------------------------------------------------
# The paper's tables, and results.md / results.json beside them (paper.write_results)

# ARC.md's text, pasted verbatim (not retyped): section 4 for ViT-B/16, section 11 for the others
ARC_MD_SECTION_4 = """
VTAB-1k ARC (0.13M): CIFAR-100 72.2, Caltech101 90.1, DTD 72.7, Flowers102 99.0, Pets 91.0, SVHN 91.9,
Sun397 54.4 | Camelyon 84.9, EuroSAT 95.7, Resisc45 86.7, Retinopathy 75.8 | Clevr-Count 80.7,
Clevr-Dist 67.1, DMLab 48.7, KITTI 81.6, dSpr-Loc 79.2, dSpr-Ori 51.0, sNORB-Azim 31.4, sNORB-Ele 39.9;
group means 81.6 / 85.8 / 60.0, overall 73.4.
DTD for comparison: full fine-tuning 64.3, linear probe 63.2, LoRA 69.4, VPT-Deep 65.8.
FGVC ARC (0.25M): CUB 88.5, NABirds 85.3, Flowers 99.3, Dogs 91.9, Cars 85.7, mean 90.1.
"""  # noqa: E501
ARC_MD_SECTION_11 = """
| task | ViT-L/16 | ViT-H/14 | Swin-B | ARC* (AugReg ViT-B/16) |
|---|---|---|---|---|
| cifar | 76.2 | 67.6 | 62.5 | 71.2 |
| caltech101 | 89.6 | 90.2 | 90.0 | 90.9 |
| dtd | 73.4 | 69.5 | 71.9 | 75.9 |
| oxford_flowers102 | 99.1 | 98.4 | 99.2 | 99.5 |
| oxford_iiit_pet | 90.3 | 87.9 | 87.8 | 92.1 |
| svhn | 90.9 | 90.8 | 90.7 | 90.8 |
| sun397 | 56.5 | 49.6 | 51.1 | 52.0 |
| patch_camelyon | 85.0 | 84.5 | 89.1 | 87.4 |
| eurosat | 95.7 | 94.9 | 95.8 | 96.5 |
| resisc45 | 85.9 | 85.1 | 84.5 | 87.6 |
| diabetic_retinopathy | 75.8 | 74.6 | 77.0 | 76.4 |
| clevr_count | 78.6 | 75.2 | 75.4 | 83.3 |
| clevr_dist | 62.1 | 66.7 | 57.4 | 61.1 |
| dmlab | 46.7 | 46.2 | 53.4 | 54.6 |
| kitti | 76.7 | 76.4 | 83.1 | 81.7 |
| dsprites_loc | 75.9 | - | 91.7 | - |
| dsprites_ori | - | - | 55.2 | - |
| smallnorb_azi | - | - | 31.6 | 30.9 |
| smallnorb_ele | - | - | - | 41.3 |
| groups (natural / specialized / structured) | 82.3 / 85.6 / 57.3 | 79.1 / 84.8 / 53.7 | 79.0 / 86.6 / 59.9 | 81.8 / 87.0 / 61.4 |
| mean of the 19 tasks | 72.5 | 69.6 | 72.6 | 74.3 |
| trainable parameters (paper) | 0.18M | 0.22M | 0.27M | 0.13M |

- FGVC, ARC* (AugReg ViT-B/16, 0.25M): CUB 89.3, NABirds 85.7, Flowers 99.7, Dogs 89.1, Cars 89.5, mean 90.7.
"""  # noqa: E501
SECTION_4_NAMES = {  # section 4's names -> the project's task names
    "CIFAR-100": "cifar",
    "Caltech101": "caltech101",
    "DTD": "dtd",
    "Flowers102": "oxford_flowers102",
    "Pets": "oxford_iiit_pet",
    "SVHN": "svhn",
    "Sun397": "sun397",
    "Camelyon": "patch_camelyon",
    "EuroSAT": "eurosat",
    "Resisc45": "resisc45",
    "Retinopathy": "diabetic_retinopathy",
    "Clevr-Count": "clevr_count",
    "Clevr-Dist": "clevr_dist",
    "DMLab": "dmlab",
    "KITTI": "kitti",
    "dSpr-Loc": "dsprites_loc",
    "dSpr-Ori": "dsprites_ori",
    "sNORB-Azim": "smallnorb_azi",
    "sNORB-Ele": "smallnorb_ele",
    "CUB": "cub",
    "NABirds": "nabirds",
    "Flowers": "flowers",
    "Dogs": "dogs",
    "Cars": "cars",
}
COLUMNS = {  # (model, weights) -> its column in paper.PAPER_ACCURACY
    ("vit_b16", "auto"): 0,
    ("vit_l16", "auto"): 1,
    ("vit_h14", "auto"): 2,
    ("swin_b", "auto"): 3,
    ("vit_b16", "augreg"): 4,
}


def named_figures(text):
    """{task: figure} of a text of ARC.md that lists 'Name 72.2' pairs, names as SECTION_4_NAMES."""
    return {
        SECTION_4_NAMES[name]: float(value)
        for name, value in re.findall(r"(\S+) (\d+\.\d)\b", text)
    }


def arc_md_tables():
    """{(model, weights): {row: figure or None}} with the rows of paper.PAPER_ACCURACY, and
    {(model, weights, suite): "0.13M"}, read from the pasted text of ARC.md."""
    vtab, rest = ARC_MD_SECTION_4.split("group means")
    fgvc = rest[rest.index("FGVC ARC") :]
    vit_b16 = named_figures(vtab.split(":", 1)[1].replace("|", ","))
    vit_b16.update(named_figures(fgvc.split(":", 1)[1].split(", mean")[0]))
    printed = re.match(r" (\d+\.\d) / (\d+\.\d) / (\d+\.\d), overall (\d+\.\d)", rest).groups()
    vit_b16.update(zip([*data.VTAB_GROUPS, "vtab-1k"], map(float, printed), strict=True))
    vit_b16["fgvc"] = float(re.search(r"mean (\d+\.\d)", fgvc).group(1))
    columns = {("vit_b16", "auto"): vit_b16}
    trainable = {
        ("vit_b16", "auto", "vtab-1k"): re.search(r"\(([\d.]+M)\)", vtab).group(1),
        ("vit_b16", "auto", "fgvc"): re.search(r"\(([\d.]+M)\)", fgvc).group(1),
    }
    others = list(COLUMNS)[1:]
    table, augreg_fgvc = ARC_MD_SECTION_11.split("- FGVC")
    for line in table.strip().splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("| ").split("|")]
        for key, text in zip(others, cells[1:], strict=True):
            column = columns.setdefault(key, {})
            if cells[0].startswith("groups"):
                column.update(zip(data.VTAB_GROUPS, map(float, text.split(" / ")), strict=True))
            elif cells[0] == "mean of the 19 tasks":
                column["vtab-1k"] = float(text)
            elif cells[0] == "trainable parameters (paper)":
                trainable[(*key, "vtab-1k")] = text
            else:
                column[cells[0]] = None if text == "-" else float(text)
    augreg = columns[("vit_b16", "augreg")]
    augreg.update(named_figures(augreg_fgvc.split("):", 1)[1].split(", mean")[0]))
    augreg["fgvc"] = float(re.search(r"mean (\d+\.\d)", augreg_fgvc).group(1))
    trainable[("vit_b16", "augreg", "fgvc")] = re.search(r"([\d.]+M)\)", augreg_fgvc).group(1)
    return columns, trainable


def test_the_paper_tables_hold_arc_md_s_figures_cell_by_cell():
    columns, trainable = arc_md_tables()
    assert list(paper.PAPER_MODELS) == list(COLUMNS)
    for key, column in COLUMNS.items():
        table = {row: values[column] for row, values in paper.PAPER_ACCURACY.items()}
        assert table == {**dict.fromkeys(table), **columns[key]}, key  # every other cell: None
    for (model, weights, suite), count in trainable.items():
        assert f"{paper.PAPER_TRAINABLE[suite][COLUMNS[(model, weights)]]}M" == count
    assert len(trainable) == 7 and len(columns[("vit_l16", "auto")]) == 23
    # a few cells typed from ARC.md by hand, so that the parsing above cannot hide a mistyped figure
    assert paper.PAPER_ACCURACY["cifar"] == (72.2, 76.2, 67.6, 62.5, 71.2)
    assert paper.PAPER_ACCURACY["smallnorb_ele"] == (39.9, None, None, None, 41.3)
    assert paper.PAPER_ACCURACY["structured"] == (60.0, 57.3, 53.7, 59.9, 61.4)
    assert paper.PAPER_ACCURACY["vtab-1k"] == (73.4, 72.5, 69.6, 72.6, 74.3)
    assert paper.PAPER_ACCURACY["dogs"] == (91.9, None, None, None, 89.1)
    assert paper.PAPER_ACCURACY["fgvc"] == (90.1, None, None, None, 90.7)
    assert paper.PAPER_TRAINABLE == {
        "vtab-1k": (0.13, 0.18, 0.22, 0.27, 0.13),
        "fgvc": (0.25, None, None, None, 0.25),
    }


# The cells the source does not give, per model: its structured group mean cannot be recomputed
MISSING = {
    ("vit_b16", "auto"): set(),
    ("vit_l16", "auto"): {"dsprites_ori", "smallnorb_azi", "smallnorb_ele"},
    ("vit_h14", "auto"): {"dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"},
    ("swin_b", "auto"): {"smallnorb_ele"},
    ("vit_b16", "augreg"): {"dsprites_loc", "dsprites_ori"},
}


@pytest.mark.parametrize("model, weights", list(COLUMNS))
def test_the_paper_s_printed_group_means_are_the_means_of_its_cells(model, weights):
    # For each model the paper reports: its 19 VTAB-1k tasks; each group mean it prints is the mean
    # of the group's cells, to the paper's rounding (0.1), where all are given; its mean of the 19
    # tasks is the group means weighted by their sizes, to the rounding of four printed figures.
    column = COLUMNS[(model, weights)]
    table = {row: values[column] for row, values in paper.PAPER_ACCURACY.items()}
    assert all(task in table for task in data.SUITES["vtab-1k"])
    assert len(data.SUITES["vtab-1k"]) == 19
    missing = {task for task in data.SUITES["vtab-1k"] if table[task] is None}
    assert missing == MISSING[(model, weights)]
    recomputed = 0
    for group, members in data.VTAB_GROUPS.items():
        assert table[group] is not None  # printed even where cells are missing
        if not set(members) & missing:
            cells = [table[task] for task in members]
            assert abs(sum(cells) / len(cells) - table[group]) <= 0.05 + 1e-9, group
            recomputed += 1
    assert recomputed == 3 - bool(missing)  # only the structured group has missing cells
    weighted = sum(len(members) * table[group] for group, members in data.VTAB_GROUPS.items())
    assert abs(weighted / 19 - table["vtab-1k"]) <= 0.1 + 1e-9
    if not missing:  # ViT-B/16: the mean of its 19 cells, 1394.0 / 19
        assert sum(table[task] for task in data.SUITES["vtab-1k"]) == pytest.approx(1394.0)
        assert round(1394.0 / 19, 1) == table["vtab-1k"] == 73.4
    fgvc = [table[name] for name in data.SUITES["fgvc"]]
    if None not in fgvc:  # ViT-B/16 and ARC*
        assert abs(sum(fgvc) / 5 - table["fgvc"]) <= 0.05 + 1e-9


def row(*cells):
    """A row of results.md with these cells."""
    return "| " + " | ".join(cells) + " |"


def seed_results(finals, trainable=100_000):
    """The result dicts of a task's seeds (42, 43, ...) with these final accuracies."""
    return [
        {
            "final": final,
            "best": final + 1.5 * seed_index,
            "trainable": trainable,
            "seconds": {"setup": 1.0, "training": 60.0, "testing": 5.0},
            "seed": 42 + seed_index,
        }
        for seed_index, final in enumerate(finals)
    ]


def test_results_give_each_task_s_mean_and_std_over_seeds_and_both_means(tmp_path):
    results = {"dtd": seed_results([70.0, 73.0]), "eurosat": seed_results([95.5, 96.1])}
    paper.write_results(str(tmp_path), results, "vit_b16", "arc", "auto")
    summary = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    for task, seeds in results.items():
        finals = [result["final"] for result in seeds]
        bests = [result["best"] for result in seeds]
        reported = summary["tasks"][task]
        assert reported["seeds"] == 2 and reported["runs"] == seeds
        assert reported["final"] == pytest.approx(np.mean(finals))
        assert reported["final_std"] == pytest.approx(np.std(finals, ddof=1))  # sample std
        assert reported["best"] == pytest.approx(np.mean(bests))
        assert reported["best_std"] == pytest.approx(np.std(bests, ddof=1))
        cells = f"| {task} | 2 | {np.mean(finals):.2f} ± {np.std(finals, ddof=1):.2f} | "
        assert cells + f"{np.mean(bests):.2f} ± {np.std(bests, ddof=1):.2f} | 100,000 |" in table
    assert summary["tasks"]["dtd"]["final_std"] == pytest.approx(2.1213, abs=1e-4)
    assert summary["groups"] == {"natural": 71.5, "specialized": pytest.approx(95.8)}
    assert summary["mean"] == pytest.approx((71.5 + 95.8) / 2)
    assert summary["mean_of_groups"] is None  # two of the three groups
    # the paper's ViT-B/16 figures beside the tasks; its printed means beside a whole suite only
    assert summary["paper"]["figures"] == {"dtd": 72.7, "eurosat": 95.7}
    assert summary["paper"]["trainable"] is None
    assert "| 100,000 | 72.7 | -1.20 |" in table  # 71.5 - 72.7
    assert row("**natural mean** (1 tasks)", "", "71.50", "", "", "", "") in table
    label = "**mean of the 2 task accuracies** (the paper's convention)"
    assert row(label, "", "83.65", "", "", "", "") + "\n" in table  # no whole suite: no figure
    assert "group means" not in table and "Trainable parameters" not in table
    assert "sample standard deviation (n - 1)" in table and "selected on the test set" in table


def test_results_of_the_whole_vtab_suite_give_the_paper_s_means_in_both_conventions(tmp_path):
    # The paper's own ViT-B/16 cells, as one seed each, give back its printed means: 81.6, 85.8 and
    # 60.0, the mean of the 19 tasks 73.4 (1394.0 / 19), and the mean of the three groups 75.8
    column = {task: values[0] for task, values in paper.PAPER_ACCURACY.items()}
    results = {task: seed_results([column[task]], 130_000) for task in data.SUITES["vtab-1k"]}
    paper.write_results(str(tmp_path), results, "vit_b16", "arc", "auto")
    summary = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    groups = {g: round(m, 1) for g, m in summary["groups"].items()}
    assert groups == {"natural": 81.6, "specialized": 85.8, "structured": 60.0}
    assert summary["mean"] == pytest.approx(1394.0 / 19) and round(summary["mean"], 1) == 73.4
    assert summary["mean_of_groups"] == pytest.approx(sum(summary["groups"].values()) / 3)
    assert round(summary["mean_of_groups"], 1) == 75.8
    assert summary["paper"]["figures"]["vtab-1k"] == 73.4
    assert summary["paper"]["figures"]["structured"] == 60.0
    assert summary["tasks"]["cifar"]["final_std"] is None  # one seed: no standard deviation
    assert row("cifar", "1", "72.20", "72.20", "130,000", "72.2", "+0.00") in table
    assert row("**structured mean** (8 tasks)", "", "59.95", "", "", "60.0", "-0.05") in table
    label = "**mean of the 19 task accuracies** (the paper's convention)"
    assert row(label, "", "73.37", "", "", "73.4", "-0.03") in table
    label = "**mean of the 3 group means** (RepAdapter's and PACE's convention)"
    assert row(label, "", "75.78", "", "", "", "") in table
    assert "±" not in table.split("\n| task")[1]  # one seed each: no ± in the table
    assert "0.13M here, 0.13M in the paper" in table

    # ViT-L/16, two seeds: its missing cells stay empty, its printed means stand beside the suite's,
    # and the table says why its count of trainable parameters is not the paper's
    results = {
        task: seed_results([50.0 + i, 52.0 + i], 205_000)
        for i, task in enumerate(data.SUITES["vtab-1k"])
    }
    paper.write_results(str(tmp_path), results, "vit_l16", "arc", "auto")
    summary = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    finals = [np.mean([run["final"] for run in runs]) for runs in results.values()]
    assert summary["mean"] == pytest.approx(np.mean(finals))
    by_group = [
        np.mean([finals[data.SUITES["vtab-1k"].index(task)] for task in members])
        for members in data.VTAB_GROUPS.values()
    ]
    assert summary["mean_of_groups"] == pytest.approx(np.mean(by_group))
    assert summary["paper"]["model"] == "ViT-L/16" and summary["paper"]["trainable"] == 0.18
    assert summary["paper"]["figures"]["smallnorb_ele"] is None
    assert summary["paper"]["figures"]["structured"] == 57.3
    assert summary["paper"]["figures"]["vtab-1k"] == 72.5
    cells = ["69.00 ± 1.41", "69.75 ± 2.47", "205,000", "", ""]
    assert row("smallnorb_ele", "2", *cells) in table
    assert "0.20M here, 0.18M in the paper" in table and "r is not tuned to match" in table


def test_results_beside_the_paper_s_arc_star_and_fgvc_rows_and_nothing_for_other_methods(tmp_path):
    results = {name: seed_results([80.0, 81.0, 82.0], 280_000) for name in data.SUITES["fgvc"]}
    paper.write_results(str(tmp_path), results, "vit_b16", "arc", "augreg")
    summary = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    assert summary["paper"]["model"] == "ARC* (ViT-B/16, AugReg weights)"
    assert summary["paper"]["figures"] == {
        "cub": 89.3,
        "nabirds": 85.7,
        "flowers": 99.7,
        "dogs": 89.1,
        "cars": 89.5,
        "fgvc": 90.7,
    }
    assert summary["groups"] == {} and summary["mean_of_groups"] is None
    assert summary["tasks"]["cub"]["final_std"] == pytest.approx(1.0)  # 80, 81, 82: n - 1
    label = "**mean of the 5 task accuracies** (the paper's convention)"
    assert row(label, "", "81.00", "", "", "90.7", "-9.70") in table
    assert "0.28M here, 0.25M in the paper" in table
    # The paper does not report Swin-B on FGVC: every cell empty, and no count. Other methods, or
    # other weights: no paper column.
    paper.write_results(str(tmp_path), results, "swin_b", "arc", "auto")
    reference = json.loads((tmp_path / "results.json").read_text())["paper"]
    assert reference["figures"] == dict.fromkeys([*data.SUITES["fgvc"], "fgvc"])
    assert reference["trainable"] is None
    table = (tmp_path / "results.md").read_text()
    assert row("cub", "3", "81.00 ± 1.00", "82.50 ± 2.50", "280,000", "", "") in table
    assert "paper: Swin-B" in table and "Trainable parameters" not in table
    for model, method, weights in [("vit_b16", "linear", "auto"), ("vit_b16", "arc", "none")]:
        paper.write_results(str(tmp_path), results, model, method, weights)
        assert "paper" not in json.loads((tmp_path / "results.json").read_text())
        table = (tmp_path / "results.md").read_text()
        assert row("cub", "3", "81.00 ± 1.00", "82.50 ± 2.50", "280,000") + "\n" in table
        assert "final - paper" not in table and "Trainable parameters" not in table


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
        assert [run["seed"] for run in results["tasks"][task]["runs"]] == [42, 43]
        assert results["tasks"][task]["final"] == pytest.approx(np.mean(finals[task]))
        assert results["tasks"][task]["final_std"] == pytest.approx(np.std(finals[task], ddof=1))
    assert results["mean"] == pytest.approx(np.mean([np.mean(f) for f in finals.values()]))


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
    assert [run["seed"] for run in results["tasks"]["synthetic"]["runs"]] == [7, 8, 9]
    assert results["tasks"]["synthetic"]["final"] == pytest.approx(np.mean(finals))
    assert results["tasks"]["synthetic"]["final_std"] == pytest.approx(np.std(finals, ddof=1))
    assert len({metrics(out / f"seed{s}")[-1]["loss"] for s in (7, 8, 9)}) == 3  # three runs
    # resumed with --seeds again (the same, then one more): the finished seeds stay as they are
    assert run_train("--resume", out, "--seeds", "3", "--workers", "0") == 0
    assert run_train("--resume", out, "--seeds", "4", "--workers", "0") == 0
    results = json.loads((out / "results.json").read_text())
    assert [run["seed"] for run in results["tasks"]["synthetic"]["runs"]] == [7, 8, 9, 10]
    assert [metrics(out / f"seed{s}")[-1]["test_acc"] for s in (7, 8, 9)] == finals


@pytest.mark.parametrize("second", ["b/imgs", "a/imgs"])
def test_two_tasks_that_would_share_a_folder_are_refused(tmp_path, capsys, second):
    # a/imgs,b/imgs: both runs would be <out>/imgs, the second reported from the first's files
    write_image_folder(tmp_path / "a" / "imgs")
    write_image_folder(tmp_path / "b" / "imgs", classes=("x", "y", "z"))
    tasks = f"{tmp_path / 'a' / 'imgs'},{tmp_path / second}"
    out = tmp_path / "out"
    fails_with_one_line(["--data", tasks, *SUITE, "--out", out], capsys, "imgs twice")
    assert not out.exists()
