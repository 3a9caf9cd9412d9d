"""The paper's experiments: the authors' recipe for each task and model, and with it every setting
of a run; the paper's accuracies; suites of tasks run one after another into one folder, with the
results table beside the paper's.

    recipe("cub", "vit_b16")   # ("FGVC cub (FGVC_ARC_train.py)", {"lr": 1e-3, ...})
    settings({"data": "cub", "lr": 2e-3})   # every setting of a run, and where it came from
    suite_tasks("vtab-1k")     # the 19 VTAB-1k tasks in the paper's order; "dtd,eurosat": two
    run_suite(given, seeds, out, ctx, resume, run_task)   # --data vtab-1k, --seeds N: results

The recipes are what the official scripts ran (ARC.md sections 3 and 7), also where that differs
from the paper's text: the README says where.
"""

import contextlib
import json
import os
import statistics
from types import SimpleNamespace

import data
from runs import UserError, finished, flag, fmt_time, owned, save_atomic

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
    first = {**DEFAULTS, **(saved or {}), **given}
    recipe_name, recipe_values = recipe(first["data"], first["model"])
    cfg, sources = {}, {}
    for key in DEFAULTS:
        cfg[key], sources[key] = next(
            (values[key], source)
            for source, values in (
                ("command line", given),
                ("run", saved or {}),
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
            cfg[key] = DEFAULTS[key] if key == "swin_ffn_adapter" else 0.0
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


ACCURACY = {  # the ARC paper's ViT-B/16 top-1 accuracies (ARC.md section 4), shown beside vit_b16 arc results
    "cifar": 72.2,
    "caltech101": 90.1,
    "dtd": 72.7,
    "oxford_flowers102": 99.0,
    "oxford_iiit_pet": 91.0,
    "svhn": 91.9,
    "sun397": 54.4,
    "patch_camelyon": 84.9,
    "eurosat": 95.7,
    "resisc45": 86.7,
    "diabetic_retinopathy": 75.8,
    "clevr_count": 80.7,
    "clevr_dist": 67.1,
    "dmlab": 48.7,
    "kitti": 81.6,
    "dsprites_loc": 79.2,
    "dsprites_ori": 51.0,
    "smallnorb_azi": 31.4,
    "smallnorb_ele": 39.9,
    "cub": 88.5,
    "nabirds": 85.3,
    "flowers": 99.3,
    "dogs": 91.9,
    "cars": 85.7,
}


# --------------------------------------------------------------------------------------------------
# Suites: a folder per task, and the paper's tables


def suite_tasks(name):
    """The tasks of a suite (vtab-1k, fgvc) or of a comma-separated list; None for a single task."""
    if name in data.SUITES:
        return data.SUITES[name]
    return [t.strip() for t in name.split(",") if t.strip()] if "," in name else None


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
    seeds = seeds or stored.pop("seeds")
    options = {"data_dir": os.path.abspath(DEFAULTS["data_dir"]), **stored, **given}
    listed = suite_tasks(options["data"])  # else one task, run with several seeds
    first_seed = options.get("seed", DEFAULTS["seed"])
    plan = []  # (task, seed, folder) of each run
    for task in listed or [options["data"]]:
        task_folder = os.path.join(out, os.path.basename(os.path.normpath(task))) if listed else out
        for seed in range(first_seed, first_seed + seeds):
            folder = os.path.join(task_folder, f"seed{seed}") if seeds > 1 else task_folder
            plan.append((task, seed, folder))
    missing = {  # a finished run needs no data
        task: data.missing(task, options["data_dir"])
        for task, _, folder in plan
        if not finished(folder, options.get("epochs"))
    }
    if any(missing.values()):
        absent = ", ".join(f"{task} ({path} is missing)" for task, path in missing.items() if path)
        others = ",".join(task for task in listed or [] if not missing.get(task))
        raise UserError(
            f"no data for {sum(map(bool, missing.values()))} of the {len(listed or [1])} tasks: "
            f"{absent}. Put it there, or run the others: --data {others}"
        )
    suite = {**DEFAULTS, **options}
    results = {}
    with owned(out, fresh=not resume) if ctx.rank == 0 else contextlib.nullcontext():
        if ctx.rank == 0 and not resume:
            save_atomic(json.dumps({**options, "seeds": seeds}, indent=1), suite_file)
        for task, seed, folder in plan:
            started = os.path.exists(os.path.join(folder, "checkpoint.pth"))
            done = not started and finished(folder, options.get("epochs"))
            run_options = {**options, "data": task, "seed": seed}
            result = (
                done["result"] if done else run_task(run_options, folder, ctx, started and folder)
            )
            name = os.path.basename(os.path.normpath(task))  # a folder by its name
            results.setdefault(name, []).append({**result, "seed": seed})
            if ctx.rank == 0:
                write_results(out, results, suite["model"], suite["method"], suite["weights"])
    return results


def read_suite(path, out):
    if not os.path.isfile(path):
        raise UserError(f"--resume {out}: no suite.json there, so it is not a suite's folder")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--resume {out}: {path} is unreadable ({type(e).__name__}: {e}); a suite's folder "
            f"holds the suite.json it wrote"
        ) from None


def write_results(out, results, model, method, weights="auto"):
    """results.json and results.md: each task's final and best accuracy (the mean over its seeds),
    the VTAB-1k group means, the mean of all tasks (of the task accuracies, as the paper's 73.4: not
    of the group means), and beside them the paper's ARC figures for the same tasks when the run is
    the paper's (vit_b16, arc). `results`: {task: [the result of each finished seed]}."""
    per_seed = results
    results = {}
    for task, seed_results in per_seed.items():
        results[task] = {
            key: round(statistics.mean(r[key] for r in seed_results), 2)
            for key in ("final", "best")
        }
        results[task]["final_std"] = round(statistics.pstdev(r["final"] for r in seed_results), 2)
        results[task]["seeds"] = [r["seed"] for r in seed_results]
        results[task]["trainable"] = seed_results[0]["trainable"]
        results[task]["seconds"] = {
            part: sum(r["seconds"][part] for r in seed_results) for part in ("training", "testing")
        }

    def mean(values):
        return round(sum(values) / len(values), 2)

    groups = {
        g: [t for t in tasks if t in results]
        for g, tasks in data.VTAB_GROUPS.items()
        if set(tasks) & set(results)
    }
    summary = {
        "tasks": results,
        "groups": {g: mean([results[t]["final"] for t in ts]) for g, ts in groups.items()},
        "mean": mean([r["final"] for r in results.values()]),
    }
    paper = (model, method, weights) == ("vit_b16", "arc", "auto") and set(results) <= set(ACCURACY)
    if paper:
        summary["paper"] = {
            "tasks": {t: ACCURACY[t] for t in results},
            "mean": mean([ACCURACY[t] for t in results]),
            "groups": {g: mean([ACCURACY[t] for t in ts]) for g, ts in groups.items()},
        }
    save_atomic(json.dumps(summary, indent=1), os.path.join(out, "results.json"))

    def row(name, final, best=None, reference=0.0, trainable="", seconds=""):
        cells = [name, f"{final:.2f}", f"{best:.2f}" if best is not None else ""]
        cells += [f"{reference:.1f}", f"{final - reference:+.2f}"] * paper + [trainable, seconds]
        return "| " + " | ".join(cells) + " |"

    lines = [
        f"# ARC: {model}, {method}",
        "",
        "Top-1 test accuracy (%). **final**: after the last epoch, the honest "
        "figure. **best**: the best of the evaluated epochs, selected on the test set, as the official code reports "
        "(its protocol tests every epoch: `--eval-every 1`)."
        + " **paper**: the ARC paper's ViT-B/16 figures."
        * paper,
        "",
        "| task | final | best (test-selected) | "
        + "paper | final - paper | " * paper
        + "trainable | training + "
        "testing |",
        "|---" * (5 + 2 * paper) + "|",
    ]
    ungrouped = [t for t in results if not any(t in ts for ts in groups.values())]
    for group, tasks in [*groups.items(), ("", ungrouped)]:
        for t in tasks:
            lines.append(
                row(
                    t,
                    results[t]["final"],
                    results[t]["best"],
                    ACCURACY.get(t, 0.0),
                    f"{results[t]['trainable']:,}",
                    fmt_time(results[t]["seconds"]["training"] + results[t]["seconds"]["testing"]),
                )
            )
        if group:
            lines.append(
                row(
                    f"**{group} mean** ({len(tasks)} tasks)",
                    summary["groups"][group],
                    reference=paper and summary["paper"]["groups"][group],
                )
            )
    lines.append(
        row(
            f"**mean of all {len(results)} tasks**",
            summary["mean"],
            reference=paper and summary["paper"]["mean"],
        )
    )
    save_atomic("\n".join(lines) + "\n", os.path.join(out, "results.md"))
