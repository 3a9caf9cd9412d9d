"""The paper's experiments: the authors' recipe for each task and model, and with it every setting
of a run; the paper's accuracies; suites of tasks run one after another into one folder, with the
results table beside the paper's.

    recipe("cub", "vit_b16")   # ("FGVC cub (FGVC_ARC_train.py)", {"lr": 1e-3, ...})
    settings({"data": "cub", "lr": 2e-3})   # every setting of a run, and where it came from
    suite_tasks("vtab-1k")     # the 19 VTAB-1k tasks in the paper's order; "dtd,eurosat": two
    run_suite(given, seeds, out, ctx, resume, run_task)   # --data vtab-1k, --seeds N: results

The recipes are what the official scripts (vtab_ARC_train.py, FGVC_ARC_train.py, train_ARC_swin.py)
ran, also where that differs from the paper's text: the README says where.
"""

import contextlib
import json
import os
import statistics
from types import SimpleNamespace

import data
from runs import UserError, finished, flag, owned, save_atomic

# vtab_ARC_train.py on the ViT: VTAB-1k, and image folders and synthetic data
VTAB_RECIPE = dict(
    lr=1e-2, weight_decay=0.0, warmup_epochs=10, adapter_dropout=0.1, vit_dropout=0.0, drop_path=0.0
)
FGVC_RECIPES = {  # FGVC_ARC_train.py, the authors' settings per dataset
    "cub": dict(lr=1e-3, weight_decay=0.05, adapter_dropout=0.1, vit_dropout=0.1),
    "nabirds": dict(lr=2e-4, weight_decay=0.05, adapter_dropout=0.1, vit_dropout=0.1),
    "flowers": dict(lr=2.5e-3, weight_decay=0.01, adapter_dropout=0.1, vit_dropout=0.1),
    "dogs": dict(lr=2.5e-4, weight_decay=0.05, adapter_dropout=0.1, vit_dropout=0.0),
    "cars": dict(lr=5e-3, weight_decay=0.05, adapter_dropout=0.0, vit_dropout=0.1),
}
# train_ARC_swin.py with Model/ARC_swin_b.py: drop-path 0.1, and adapter dropout 0.5 (the blocks'
# default) in every run, as the per-task 'a_drop' it prints never reaches the model. Its lr and
# weight decay per task:
SWIN_RECIPE = dict(adapter_dropout=0.5, drop_path=0.1)
SWIN_VTAB = {
    "cifar": (5e-3, 1e-2),
    "caltech101": (3e-3, 5e-2),
    "dtd": (5e-3, 5e-2),
    "oxford_flowers102": (5e-3, 5e-5),
    "oxford_iiit_pet": (1e-2, 5e-2),
    "svhn": (1e-2, 5e-2),
    "sun397": (5e-3, 5e-5),
    "patch_camelyon": (5e-3, 5e-5),
    "eurosat": (3e-3, 0.0),
    "resisc45": (1e-2, 0.0),
    "diabetic_retinopathy": (5e-3, 5e-5),
    "clevr_count": (2e-3, 5e-2),
    "clevr_dist": (1e-3, 5e-2),
    "dmlab": (5e-3, 1e-2),
    "kitti": (1e-2, 0.0),
    "dsprites_loc": (1e-2, 0.0),
    "dsprites_ori": (5e-3, 0.0),
    "smallnorb_azi": (1e-2, 5e-3),
    "smallnorb_ele": (1e-3, 5e-2),
}
RECIPE_KEYS = tuple(VTAB_RECIPE)


def recipe(task, model):
    """(name, settings) of the authors' recipe for `task` on `model`: values for every key of
    RECIPE_KEYS."""
    if model.startswith("swin"):
        lr, weight_decay = SWIN_VTAB.get(task, (VTAB_RECIPE["lr"], VTAB_RECIPE["weight_decay"]))
        name = (
            "Swin VTAB-1k"
            if task in SWIN_VTAB
            else f"Swin (no official {task} run: VTAB-1k's lr and weight decay)"
        )
        return f"{name} (train_ARC_swin.py)", {
            **VTAB_RECIPE,
            **SWIN_RECIPE,
            "lr": lr,
            "weight_decay": weight_decay,
        }
    if task in FGVC_RECIPES:
        return f"FGVC {task} (FGVC_ARC_train.py)", {**VTAB_RECIPE, **FGVC_RECIPES[task]}
    return "VTAB-1k (vtab_ARC_train.py)", dict(VTAB_RECIPE)


# The settings of a run (train.py's options) when neither the command line, the run resumed nor a
# recipe gives them
DEFAULTS = dict(
    data="dtd",
    data_dir="./data",
    model="vit_b16",
    weights="auto",
    method="arc",
    rank=50,
    batch_size=32,
    epochs=100,
    img_size=224,
    seed=42,
    eval_every=10,
    precision="auto",
    swin_ffn_adapter="norm2",
    **VTAB_RECIPE,
)
ONLY_FOR = {"vit_dropout": "vit", "drop_path": "swin", "swin_ffn_adapter": "swin"}  # one family's


def settings(given, saved=None, auto_precision=("fp32", "auto")):
    """The run's settings, each with where it came from: the command line, the run being resumed,
    the recipe for its task and model, or DEFAULTS. Built once: (settings, sources, recipe's name).
    `auto_precision`: what --precision auto means here, and why."""
    saved = saved or {}
    first = {**DEFAULTS, **saved, **given}
    recipe_name, recipe_values = recipe(first["data"], first["model"])
    cfg, sources = {}, {}
    for key in DEFAULTS:
        cfg[key], sources[key] = next(
            (values[key], source)
            for source, values in (
                ("command line", given),
                ("run", saved),
                ("recipe", recipe_values),
                ("default", DEFAULTS),
            )
            if key in values
        )
    cfg["data_dir"] = os.path.abspath(cfg["data_dir"])
    if cfg["precision"] == "auto":
        cfg["precision"], sources["precision"] = auto_precision
    for key, family in ONLY_FOR.items():
        if not cfg["model"].startswith(family):
            if given.get(key):
                raise UserError(
                    f"{flag(key)} does not apply to {cfg['model']}: --vit-dropout is for ViTs, "
                    f"--drop-path and --swin-ffn-adapter for Swin"
                )
            cfg[key] = DEFAULTS[key]
            sources[key] = "n/a"
    if 0 < cfg["epochs"] <= cfg["warmup_epochs"] and sources["warmup_epochs"] != "run":
        if sources["warmup_epochs"] == "command line":
            raise UserError(
                f"--warmup-epochs {cfg['warmup_epochs']} must be less than --epochs "
                f"{cfg['epochs']}, or the learning rate never decays"
            )
        cfg["warmup_epochs"] = cfg["epochs"] // 10
        sources["warmup_epochs"] = "shortened to a tenth of --epochs"
    return SimpleNamespace(**cfg), sources, recipe_name


# The ARC paper's top-1 accuracies (%) with ARC on each model it reports: ViT-B/16 as the paper
# prints them (its Table 1 and FGVC table); ViT-L/16, ViT-H/14, Swin-B and ARC* (ViT-B/16 from
# Google's AugReg ImageNet-21k weights) as the first author's RLRR (CVPR 2024, arXiv 2403.19067)
# reprints them, the ARC paper's full text being out of reach. Rows: the tasks, then
# the group means and the suites' means as printed, not recomputed. None: the source gives no
# figure, and none is inferred.
PAPER_MODELS = {  # (model, weights) -> its name, in the order of PAPER_ACCURACY's columns
    ("vit_b16", "auto"): "ViT-B/16",
    ("vit_l16", "auto"): "ViT-L/16",
    ("vit_h14", "auto"): "ViT-H/14",
    ("swin_b", "auto"): "Swin-B",
    ("vit_b16", "augreg"): "ARC* (ViT-B/16, AugReg weights)",
}
PAPER_ACCURACY = {
    "cifar": (72.2, 76.2, 67.6, 62.5, 71.2),
    "caltech101": (90.1, 89.6, 90.2, 90.0, 90.9),
    "dtd": (72.7, 73.4, 69.5, 71.9, 75.9),
    "oxford_flowers102": (99.0, 99.1, 98.4, 99.2, 99.5),
    "oxford_iiit_pet": (91.0, 90.3, 87.9, 87.8, 92.1),
    "svhn": (91.9, 90.9, 90.8, 90.7, 90.8),
    "sun397": (54.4, 56.5, 49.6, 51.1, 52.0),
    "patch_camelyon": (84.9, 85.0, 84.5, 89.1, 87.4),
    "eurosat": (95.7, 95.7, 94.9, 95.8, 96.5),
    "resisc45": (86.7, 85.9, 85.1, 84.5, 87.6),
    "diabetic_retinopathy": (75.8, 75.8, 74.6, 77.0, 76.4),
    "clevr_count": (80.7, 78.6, 75.2, 75.4, 83.3),
    "clevr_dist": (67.1, 62.1, 66.7, 57.4, 61.1),
    "dmlab": (48.7, 46.7, 46.2, 53.4, 54.6),
    "kitti": (81.6, 76.7, 76.4, 83.1, 81.7),
    "dsprites_loc": (79.2, 75.9, None, 91.7, None),
    "dsprites_ori": (51.0, None, None, 55.2, None),
    "smallnorb_azi": (31.4, None, None, 31.6, 30.9),
    "smallnorb_ele": (39.9, None, None, None, 41.3),
    "natural": (81.6, 82.3, 79.1, 79.0, 81.8),
    "specialized": (85.8, 85.6, 84.8, 86.6, 87.0),
    "structured": (60.0, 57.3, 53.7, 59.9, 61.4),
    "vtab-1k": (73.4, 72.5, 69.6, 72.6, 74.3),  # the mean of the 19 task accuracies
    "cub": (88.5, None, None, None, 89.3),
    "nabirds": (85.3, None, None, None, 85.7),
    "flowers": (99.3, None, None, None, 99.7),
    "dogs": (91.9, None, None, None, 89.1),
    "cars": (85.7, None, None, None, 89.5),
    "fgvc": (90.1, None, None, None, 90.7),
}
# The paper's trainable parameters (millions) per suite: its mean over the suite's tasks, adapters
# and heads. r = 50 and the heads give ViT-B/16 0.13M and Swin-B 0.27M, but ViT-L/16 0.20M, ViT-H/14
# 0.28M and FGVC 0.28M, though the official configs set r = 50 for every backbone.
PAPER_TRAINABLE = {
    "vtab-1k": (0.13, 0.18, 0.22, 0.27, 0.13),
    "fgvc": (0.25, None, None, None, 0.25),
}


# --------------------------------------------------------------------------------------------------
# Suites: a folder per task, and the paper's tables


def suite_tasks(name):
    """The tasks of a suite (vtab-1k, fgvc) or of a comma-separated list; None for a single task."""
    if name in data.SUITES:
        return data.SUITES[name]
    return [task for task in name.split(",") if task] if "," in name else None


def run_suite(given, seeds, out, ctx, resume, run_task):
    """Each task in turn, `seeds` times (seeds --seed, --seed + 1, ...), each run in its own folder
    of `out` with its task's recipe: run_task(options, folder, ctx, resume_from) (train.py's)
    returns its result; results.md and results.json after every run. Resumed, a suite skips finished
    runs and continues the others; options given then apply to this invocation (suite.json keeps the
    ones the suite started with)."""
    suite_file = os.path.join(out, "suite.json")
    stored = read_suite(suite_file, out) if resume else {"seeds": 1}
    if resume and given.get("data", stored["data"]) != stored["data"]:
        raise UserError(f"--resume {out} is the suite --data {stored['data']}, not {given['data']}")
    stored_seeds = stored.pop("seeds")  # not a run's setting: its runs never see it
    seeds = seeds or stored_seeds
    options = {"data_dir": os.path.abspath(DEFAULTS["data_dir"]), **stored, **given}
    listed = suite_tasks(options["data"])  # else one task, run with several seeds
    tasks = listed or [options["data"]]
    names = [os.path.basename(os.path.normpath(task)) for task in tasks]  # a folder by its name
    for name in names:
        if names.count(name) > 1:
            raise UserError(
                f"--data names {name} twice: both runs would be {os.path.join(out, name)}; give "
                f"each task, or each folder, a name of its own"
            )
    first_seed = options.get("seed", DEFAULTS["seed"])
    plan = []  # (task, its name, seed, folder) of each run
    for task, name in zip(tasks, names, strict=True):
        task_folder = os.path.join(out, name) if listed else out
        for seed in range(first_seed, first_seed + seeds):
            folder = os.path.join(task_folder, f"seed{seed}") if seeds > 1 else task_folder
            plan.append((task, name, seed, folder))
    missing = {}  # task: the path its data should be at; a finished run needs no data
    for task, _, _, folder in plan:
        path = data.missing(task, options["data_dir"])
        if path and not finished(folder, options.get("epochs")):
            missing[task] = path
    if missing:
        absent = ", ".join(f"{task} ({path} is missing)" for task, path in missing.items())
        others = ",".join(task for task in listed or [] if task not in missing)
        raise UserError(
            f"no data for {len(missing)} of the {len(listed or [1])} tasks: {absent}. Put it "
            f"there, or run the others: --data {others}"
        )
    suite = {**DEFAULTS, **options}
    results = {}
    with owned(out, fresh=not resume) if ctx.rank == 0 else contextlib.nullcontext():
        if ctx.rank == 0 and not resume:
            save_atomic(json.dumps({**options, "seeds": seeds}, indent=1), suite_file)
        for task, name, seed, folder in plan:
            started = os.path.exists(os.path.join(folder, "checkpoint.pth"))
            done = not started and finished(folder, options.get("epochs"))
            run_options = {**options, "data": task, "seed": seed}
            result = (
                done["result"] if done else run_task(run_options, folder, ctx, started and folder)
            )
            results.setdefault(name, []).append({**result, "seed": seed})
            if ctx.rank == 0:
                write_results(out, results, suite["model"], suite["method"], suite["weights"])
    return results


def read_suite(path, out):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--resume {out}: no suite.json there, or an unreadable one ({type(e).__name__}: {e}); "
            f"a suite's folder holds the suite.json it wrote"
        ) from None


def write_results(out, results, model, method, weights):
    """results.json and results.md in `out`, from `results`: {task: [the result of each finished
    seed]}. Per task, the mean and the sample standard deviation (n - 1; None for one seed) over the
    seeds of the final and of the best accuracy. Then the VTAB-1k group means, and the mean in both
    conventions: of the task accuracies (the paper's, its 73.4) and of the three group means
    (RepAdapter's and PACE's, 75.8 for the paper's figures), that one with all three groups there.
    Beside them, for ARC on a model the paper reports, the paper's figures and its count of
    trainable parameters.

    results.json: {"model", "method", "weights", "tasks": {task: {"final", "final_std", "best",
    "best_std", "seeds", "trainable", "runs": the results given}}, "groups": {group: the mean of its
    tasks' final accuracies}, "mean", "mean_of_groups" (None without all three groups), and for the
    paper's models "paper": {"model", "figures": {task, group or suite: its figure, None where it
    gives none}, "trainable": millions, or None}}."""
    tasks = {}
    for task, runs in results.items():
        tasks[task] = {}
        for key in ("final", "best"):
            values = [run[key] for run in runs]
            tasks[task][key] = statistics.mean(values)
            tasks[task][key + "_std"] = statistics.stdev(values) if len(runs) > 1 else None
        tasks[task].update(seeds=len(runs), trainable=runs[0]["trainable"], runs=runs)
    groups = {g: [t for t in members if t in tasks] for g, members in data.VTAB_GROUPS.items()}
    means = {g: statistics.mean(tasks[t]["final"] for t in ts) for g, ts in groups.items() if ts}
    summary = {
        "model": model,
        "method": method,
        "weights": weights,
        "tasks": tasks,
        "groups": means,
        "mean": statistics.mean(task["final"] for task in tasks.values()),
        "mean_of_groups": statistics.mean(means.values()) if len(means) == 3 else None,
    }
    # The paper's figures for the tasks; its printed means, and its count of trainable parameters
    # (its mean over the suite's tasks), beside a whole suite only.
    figures = {}
    trainable = None
    suite = next((s for s in PAPER_TRAINABLE if set(data.SUITES[s]) == set(tasks)), None)
    if method == "arc" and (model, weights) in PAPER_MODELS:
        column = list(PAPER_MODELS).index((model, weights))
        shown = [*tasks, *means, suite] if suite else tasks
        figures = {row: PAPER_ACCURACY[row][column] for row in shown if row in PAPER_ACCURACY}
        trainable = PAPER_TRAINABLE[suite][column] if suite else None
        summary["paper"] = {
            "model": PAPER_MODELS[(model, weights)],
            "figures": figures,
            "trainable": trainable,
        }
    save_atomic(json.dumps(summary, indent=1), os.path.join(out, "results.json"))

    header = ["task", "seeds", "final", "best (test-selected)", "trainable"]
    if figures:
        header += [f"paper: {summary['paper']['model']}", "final - paper"]
    lines = [
        f"# ARC: {model}, {method}",
        "",
        f"Weights: {weights}. Top-1 test accuracy (%), the mean ± the sample standard deviation "
        "(n - 1) over the seeds (one seed: no ±). **final**: after the last epoch, the honest "
        "figure. **best**: the best of the evaluated epochs, selected on the test set, as the "
        "official code reports (its protocol tests every epoch: `--eval-every 1`). **paper**: the "
        "ARC paper's figures (ViT-L/16, ViT-H/14, Swin-B and ARC* as the authors reprint them in "
        "RLRR, CVPR 2024), empty where they give none; the printed means and the count of "
        "trainable parameters beside a whole suite only.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]

    def add_row(name, cells, final):
        if figures.get(name) is not None:
            cells += [f"{figures[name]:.1f}", f"{final - figures[name]:+.2f}"]
        elif figures:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")

    for task, row in tasks.items():
        cells = [task, str(row["seeds"])]
        for key in ("final", "best"):
            std = row[key + "_std"]
            cells.append(f"{row[key]:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
        add_row(task, cells + [f"{row['trainable']:,}"], row["final"])
    rows = [
        (f"**{group} mean** ({len(groups[group])} tasks)", group, means[group]) for group in means
    ]
    label = f"**mean of the {len(tasks)} task accuracies** (the paper's convention)"
    rows.append((label, suite, summary["mean"]))
    label = "**mean of the 3 group means** (RepAdapter's and PACE's convention)"
    rows.append((label, "", summary["mean_of_groups"]))
    for label, name, mean in rows:
        if mean is not None:
            add_row(name, [label, "", f"{mean:.2f}", "", ""], mean)
    if trainable:
        ours = statistics.mean(task["trainable"] for task in tasks.values()) / 1e6
        lines.append(
            f"\nTrainable parameters, adapters and head: {ours:.2f}M here, "
            f"{trainable}M in the paper: the mean over the suite's tasks. "
            "Where they differ, --rank is not the official 50, or r = 50 does not give the "
            "paper's count: ViT-L/16's 0.18M, ViT-H/14's 0.22M and FGVC's 0.25M are 0.20M, 0.28M "
            "and 0.28M with r = 50 and the suite's heads. r is not tuned to match."
        )
    save_atomic("\n".join(lines) + "\n", os.path.join(out, "results.md"))
