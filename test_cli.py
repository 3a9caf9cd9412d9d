"""Tests of the command line's errors: one clear line, no traceback, nothing overwritten."""

import copy
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
import torchvision

import train
import vit
from conftest import (
    GOOD_IMAGES,
    HERE,
    SUITE,
    TINY_RUN,
    assert_one_clear_line,
    fails_with_one_line,
    file_hashes,
    quick_run_args,
    run_and_capture,
    run_train,
    write_image,
    write_image_folder,
    write_vtab_with_broken_images,
)

# --------------------------------------------------------------------------------------------------
# The command line's errors: one clear line, no traceback, nothing overwritten (in-process, then the
# real CLI)


def run_cli(args, timeout=120):
    """The real command line: (exit status, non-empty stderr lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    result = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stderr.strip().splitlines()


# case -> (out, weight files) -> a command with the finished run's --out
BAD_COMMANDS_INTO_A_RUN = {
    "a fresh run (no --resume)": lambda out, w: quick_run_args(out),
    "a fresh run of another model": lambda out, w: quick_run_args(out, model="vit_s16"),
    "a truncated --weights": lambda out, w: quick_run_args(out, weights=w["truncated.npz"]),
    "--weights of another model": lambda out, w: quick_run_args(out, weights=w["swin_t.pth"]),
    "an unknown --data": lambda out, w: quick_run_args(out, data="nope"),
    "--rank 0": lambda out, w: quick_run_args(out, rank=0),
    "--img-size 40": lambda out, w: quick_run_args(out, img_size=40),
    "--resume with another --method": lambda out, w: quick_run_args(resume=out, method="linear"),
    "--resume with a truncated --weights": lambda out, w: quick_run_args(
        resume=out, weights=w["truncated.npz"]
    ),
}


@pytest.mark.parametrize("name", ["missing.pth", "missing.npz"])
def test_missing_weights_file(tmp_path, capsys, name):
    path = tmp_path / name
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize("name", ["truncated.pth", "truncated.npz", "header_only.npz", "empty.pth"])
def test_truncated_weights_file(weight_files, tmp_path, capsys, name):
    path = weight_files[name]
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize(
    "name",
    ["notes.pth", "notes.npz", "notes.txt", "whole_model.pth", "plain_pickle.pth", "list.pth"],
)
def test_weights_file_that_is_not_a_checkpoint(weight_files, tmp_path, capsys, name):
    path = weight_files[name]
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize("name", ["swin_t.pth", "vit_s16.pth", "vit_s16.npz"])
def test_weights_of_another_model_into_vit_t16(weight_files, tmp_path, capsys, name):
    path = weight_files[name]
    fails_with_one_line(quick_run_args(tmp_path / "out", weights=path), capsys, "--weights", path)


@pytest.mark.parametrize(
    "model, name, says",
    [
        ("swin_t", "vit_t16.npz", "does not fit"),
        ("vit_t16", "whole_model.pth", "unreadable as a torch state dict (UnpicklingError"),
        ("vit_t16", "truncated.pth", "unreadable as a torch state dict (RuntimeError"),
    ],
)
def test_weight_file_errors_name_the_file_and_what_it_should_be(
    weight_files, tmp_path, capsys, model, name, says
):
    line = fails_with_one_line(
        quick_run_args(
            tmp_path / "out",
            model=model,
            weights=weight_files[name],
            img_size=224 if model == "swin_t" else 32,
        ),
        capsys,
        weight_files[name],
        says,
    )
    assert "unsafe" not in line and "trust" not in line  # never advice to load a file unsafely


def test_a_folder_as_weights(tmp_path, capsys):
    fails_with_one_line(
        quick_run_args(tmp_path / "out", weights=tmp_path),
        capsys,
        "--weights",
        tmp_path,
        "is not a file",
    )


def test_auto_weights_with_a_hub_cache_that_cannot_be_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", "/sys/torch_home")
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download")
    )
    fails_with_one_line(
        quick_run_args(tmp_path / "out", weights="auto"),
        capsys,
        "/sys/torch_home",
        "TORCH_HOME",
        "--weights PATH",
    )


def test_a_corrupt_file_in_the_hub_cache_is_named_with_how_to_fix_it(monkeypatch, tmp_path, capsys):
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(vit.URLS["vit_t16"])
    cached.parent.mkdir(parents=True)
    cached.write_text(
        "<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"
    )  # a proxy's page, saved as .npz
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download")
    )
    line = fails_with_one_line(
        quick_run_args(tmp_path / "out", weights="auto"),
        capsys,
        cached,
        "unreadable as a Google ViT .npz",
        "delete it",
    )
    assert "allow_pickle" not in line and "unsafe" not in line


@pytest.mark.parametrize(
    "failure",
    [
        urllib.error.URLError("no network"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError("timed out"),
    ],
)
def test_a_failed_download_is_not_blamed_on_the_cache(tmp_path, monkeypatch, capsys, failure):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # writable: the network is at fault

    def download(url, dst, **kw):
        raise failure

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    line = fails_with_one_line(
        quick_run_args(tmp_path / "out", weights="auto"),
        capsys,
        "could not download",
        type(failure).__name__,
        vit.URLS["vit_t16"],
        "--weights PATH",
    )
    assert "TORCH_HOME" not in line and "cannot write" not in line


def test_missing_weights_and_data_fail_with_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert run_train("--data", "synthetic", "--img-size", "32", "--out", tmp_path / "run") == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "ViT-B_16.npz" in error and vit.URLS["vit_b16"] in error
    assert (
        str(tmp_path / "torch_home" / "hub" / "checkpoints") in error and "--weights PATH" in error
    )
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(torchvision.datasets.utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.DTD, "_download", lambda self: offline(None, None))
    for name, missing in (
        ("cifar", "vtab-1k/cifar"),
        ("dtd", "dtd"),
    ):  # a VTAB-1k list; a release to download
        line = fails_with_one_line(
            [
                "--data",
                name,
                "--data-dir",
                tmp_path / "none",
                "--weights",
                "none",
                "--model",
                "vit_t16",
                "--out",
                tmp_path / name,
            ],
            capsys,
            tmp_path / "none" / missing,
        )
        assert line.startswith("error: ") and not (tmp_path / name).exists()


def test_an_unknown_data_name_lists_the_choices_in_one_line(tmp_path, capsys):
    fails_with_one_line(
        quick_run_args(tmp_path / "out", data="eurosatt"),
        capsys,
        "eurosatt",
        "synthetic",
        "eurosat",
        "dtd",
        "cub",
        "train/",
    )


def test_missing_vtab_dataset_folder(tmp_path, capsys):
    data_dir = tmp_path / "data"  # nothing under it
    fails_with_one_line(
        quick_run_args(tmp_path / "out", data="eurosat", data_dir=data_dir),
        capsys,
        os.path.join(str(data_dir), "vtab-1k", "eurosat"),
    )


def test_missing_image_folder_dataset(tmp_path, capsys):
    path = tmp_path / "my_images"  # does not exist
    fails_with_one_line(quick_run_args(tmp_path / "out", data=path), capsys, path)


def test_list_file_naming_a_missing_image(tmp_path, capsys):
    data_dir = tmp_path / "data"
    write_vtab_with_broken_images(data_dir, GOOD_IMAGES + ["missing_000123.jpg"], GOOD_IMAGES)
    fails_with_one_line(
        quick_run_args(tmp_path / "out", data="eurosat", data_dir=data_dir),
        capsys,
        "missing_000123.jpg",
        "train800val200.txt",
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_in_a_vtab_list_is_named(tmp_path, capsys, workers):
    data_dir = tmp_path / "data"
    folder = write_vtab_with_broken_images(
        data_dir, GOOD_IMAGES, GOOD_IMAGES + ["corrupt_000007.jpg"]
    )
    fails_with_one_line(
        quick_run_args(tmp_path / "out", data="eurosat", data_dir=data_dir, workers=workers),
        capsys,
        os.path.join(folder, "images", "test", "corrupt_000007.jpg"),
    )


def test_corrupt_image_in_an_image_folder_is_named(tmp_path, capsys):
    root = tmp_path / "my_images"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            write_image(root / split / label / "a.jpg", 0)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG" * 4)
    fails_with_one_line(
        quick_run_args(tmp_path / "out", data=root), capsys, root / "train" / "dog" / "broken.jpg"
    )


def test_a_list_file_that_is_not_utf8(tmp_path, capsys):
    folder = write_vtab_with_broken_images(tmp_path / "data", GOOD_IMAGES, GOOD_IMAGES)
    with open(os.path.join(folder, "test.txt"), "ab") as f:
        f.write("images/test/caf\u00e9.jpg 1\n".encode("latin-1"))
    fails_with_one_line(
        quick_run_args(tmp_path / "out", data="eurosat", data_dir=tmp_path / "data"),
        capsys,
        os.path.join(folder, "test.txt"),
        "UTF-8",
    )


def test_missing_data_is_reported_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda *a, **k: pytest.fail("downloaded before the data check"),
    )
    fails_with_one_line(
        ["--data", "cub", "--data-dir", tmp_path / "data", "--out", tmp_path / "out"],
        capsys,
        "no cub data",
        tmp_path / "data" / "fgvc" / "CUB_200_2011",
    )


def test_the_data_must_have_the_classes_the_run_was_trained_on(tmp_path, capsys):
    two, three = (
        write_image_folder(tmp_path / "two"),
        write_image_folder(tmp_path / "three", ("cat", "dog", "owl")),
    )
    out = tmp_path / "run"
    assert run_train("--data", two, *SUITE, "--out", out) == 0
    fails_with_one_line(
        ["--eval-only", "--checkpoint", out / "adapters.pth", "--data", three, "--workers", "0"],
        capsys,
        "trained on 2 classes",
        "the data has 3",
    )
    fails_with_one_line(
        ["--resume", out, "--data", three, "--epochs", "3", "--workers", "0"],
        capsys,
        "trained on 2 classes",
        "the data has 3",
    )


@pytest.mark.parametrize(
    "option, value", [("rank", 0), ("rank", -3), ("batch_size", 0), ("lr", -0.1)]
)
def test_invalid_numbers(tmp_path, capsys, option, value):
    fails_with_one_line(
        quick_run_args(tmp_path / "out", **{option: value}),
        capsys,
        "--" + option.replace("_", "-"),
        value,
    )


def test_img_size_not_a_multiple_of_the_patch_size(tmp_path, capsys):
    # vit_t16 cuts 16x16 patches: 40 is refused, naming the option, the value and the patch size
    fails_with_one_line(
        quick_run_args(tmp_path / "out", img_size=40), capsys, "--img-size", "40", "16"
    )


@pytest.mark.parametrize(
    "option, value",
    [
        ("lr", "1e38"),
        ("lr", "inf"),
        ("lr", "nan"),
        ("weight_decay", "1e300"),
        ("adapter_dropout", "1"),
        ("drop_path", "-0.1"),
    ],
)
def test_absurd_numbers(tmp_path, capsys, option, value):
    fails_with_one_line(
        quick_run_args(tmp_path / "out", **{option: value}),
        capsys,
        f"--{option.replace('_', '-')} {float(value)}",
    )


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    fails_with_one_line(
        quick_run_args(tmp_path / "notes.txt"),
        capsys,
        "--out",
        tmp_path / "notes.txt",
        "File exists",
    )
    fails_with_one_line(
        quick_run_args(tmp_path / "notes.txt" / "run"), capsys, "--out", tmp_path / "notes.txt"
    )
    if os.path.exists("/sys/kernel"):  # sysfs: no folder can be made there, not even by root
        fails_with_one_line(
            quick_run_args("/sys/arc_run"), capsys, "--out /sys/arc_run", "cannot write there"
        )


@pytest.mark.parametrize(
    "option, value, there",
    [("model", "vit_s16", "vit_t16"), ("method", "linear", "arc"), ("method", "arc_att", "arc")],
)
def test_resume_from_another_model_or_method(finished_run, capsys, option, value, there):
    out, snapshot = finished_run
    fails_with_one_line(
        quick_run_args(resume=out, **{option: value}),
        capsys,
        "--resume",
        out,
        f"--{option}",
        value,
        there,
    )
    assert file_hashes(out) == snapshot


def test_resume_from_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails_with_one_line(
        quick_run_args(resume=tmp_path / "empty"), capsys, "--resume", tmp_path / "empty"
    )


def test_a_mistyped_resume_folder_is_named(tmp_path, capsys):
    fails_with_one_line(
        ["--resume", tmp_path / "runz"], capsys, f"--resume {tmp_path / 'runz'}: no such folder"
    )


def test_folders_in_a_task_list_are_made_absolute_one_by_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (
        tmp_path / "dtd"
    ).mkdir()  # a folder that happens to bear a dataset's name: the name still means the dataset
    args, given = train.parse_args(["--data", "dtd, ./pets ,synthetic"])
    assert given["data"] == f"dtd,{tmp_path / 'pets'},synthetic"
    assert train.parse_args(["--data", "./dtd"])[1]["data"] == str(tmp_path / "dtd")
    assert train.default_out(given) == os.path.join(
        "runs", "dtd+pets+synthetic_vit_b16_arc"
    )  # each by its name
    assert train.default_out({"model": "swin_b"}) == os.path.join("runs", "dtd_swin_b_arc")


def test_resume_and_option_mistakes_get_one_clear_line(
    synthetic_run, tmp_path, monkeypatch, capsys
):
    fails_with_one_line(
        [*TINY_RUN, "--epochs", "3", "--warmup-epochs", "10"],
        capsys,
        "--warmup-epochs 10 must be less than --epochs 3",
    )
    fails_with_one_line([*TINY_RUN, "--device", "gpu"], capsys, "--device gpu is not a device")
    if not torch.cuda.is_available():
        fails_with_one_line([*TINY_RUN, "--device", "cuda"], capsys, "no CUDA GPU")
    fails_with_one_line(
        [*TINY_RUN, "--resume", synthetic_run / "adapters.pth"],
        capsys,
        "not a checkpoint.pth (adapters.pth and folded.pth hold results",
    )
    weights = tmp_path / "other.pth"
    torch.save(vit.vit_t16(num_classes=10, img_size=16).state_dict(), weights)
    fails_with_one_line(
        [*TINY_RUN, "--weights", weights, "--resume", synthetic_run], capsys, "--weights none there"
    )
    copy_of_run = tmp_path / "run"
    shutil.copytree(synthetic_run, copy_of_run)
    monkeypatch.chdir(copy_of_run)  # a bare file name: the run's folder is the current one
    assert run_train(*TINY_RUN, "--resume", "checkpoint.pth") == 0


@pytest.mark.parametrize(
    "case, args, facts",
    [
        (
            "--resume of a folder that is not a suite",
            lambda out: ["--data", "dtd,eurosat", "--resume", out],
            ["no suite.json"],
        ),
        (
            "--resume and --out differ",
            lambda out: ["--resume", out, "--out", out / "x"],
            ["name different runs"],
        ),
        (
            "--vit-dropout for a Swin",
            lambda out: ["--model", "swin_t", "--vit-dropout", "0.1", "--out", out / "x"],
            ["--vit-dropout does not apply to swin_t"],
        ),
    ],
)
def test_suite_resume_and_model_mistakes_leave_a_finished_run_as_it_was(
    finished_run, capsys, case, args, facts
):
    out, snapshot = finished_run
    fails_with_one_line([str(a) for a in args(out)], capsys, *facts)
    assert file_hashes(out) == snapshot


@pytest.mark.parametrize("case", list(BAD_COMMANDS_INTO_A_RUN))
def test_bad_input_never_overwrites_a_finished_run(finished_run, weight_files, capsys, case):
    out, snapshot = finished_run
    code, lines = run_and_capture(BAD_COMMANDS_INTO_A_RUN[case](out, weight_files), capsys)
    assert code != 0, f"{case}: accepted, exit status 0"
    assert file_hashes(out) == snapshot, f"{case}: changed the files of the finished run in {out}"
    assert_one_clear_line(code, lines)


def test_a_fresh_run_into_a_finished_run_says_how_to_continue(finished_run, capsys):
    out, snapshot = finished_run
    fails_with_one_line(quick_run_args(out), capsys, out, "--resume", "--out")
    assert file_hashes(out) == snapshot


def test_help_shows_defaults_and_dataset_names(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for text in (
        "(default: 32)",
        "(default: vit_b16)",
        "0.01 on VTAB-1k with a ViT (default: the task's recipe)",
        "eurosat",
        "cub",
        "vtab-1k",
        "synthetic",
        "--resume",
        "python train.py --data dtd",
    ):
        assert text in shown, text


def test_cli_unknown_data(tmp_path):
    # the real command line, in its own process: one line, no traceback, nothing written (the cases
    # below run train.main in this process, which ends the same way: see run_and_capture)
    code, lines = run_cli(quick_run_args(tmp_path / "out", data="no_such_task"))
    assert_one_clear_line(code, lines, "no_such_task", "synthetic", "eurosat", "cub")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("case", ["truncated.npz", "notes.pth", "--batch-size 0"])
def test_cli_bad_weights_or_numbers(case, weight_files, tmp_path, capsys):
    if case.startswith("--"):
        args, facts = quick_run_args(tmp_path / "out", batch_size=0), ("--batch-size", "0")
    else:
        args, facts = (
            quick_run_args(tmp_path / "out", weights=weight_files[case]),
            ("--weights", weight_files[case]),
        )
    fails_with_one_line(args, capsys, *facts)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("seed", "1e20", "invalid int value"),
        ("seed", str(10**15), "from 0 to 2147483647"),
        ("img_size", "65536", "from 16 to 4096"),
        ("rank", "100000000", "from 1 to 4096"),
        ("seeds", "0", "from 1 to 100"),
    ],
)
def test_numbers_beyond_their_range_are_refused_at_once(tmp_path, capsys, option, value, says):
    fails_with_one_line(
        quick_run_args(tmp_path / "out", **{option: value}),
        capsys,
        "--" + option.replace("_", "-"),
        value,
        says,
    )


@pytest.mark.parametrize("case", ["a broken link", "a name of 300 bytes", "empty"])
def test_a_bad_out_is_refused_before_the_data_is_decoded(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(
        train.data, "build", lambda *a, **k: pytest.fail("decoded the data before checking --out")
    )
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = {"a broken link": tmp_path / "link", "a name of 300 bytes": tmp_path / ("x" * 300)}
    fails_with_one_line(quick_run_args(out.get(case, "")), capsys, "--out")
    assert sorted(os.listdir(tmp_path)) == ["link"]  # nothing made


def test_an_empty_resume_or_checkpoint_is_refused(capsys):
    fails_with_one_line(["--resume", ""], capsys, "--resume: is empty")
    fails_with_one_line(["--eval-only", "--checkpoint", ""], capsys, "--checkpoint: is empty")


def without(saved, *path):
    """A copy of a saved file's dict with the entry at `path` removed (the last key) or emptied."""
    saved = copy.deepcopy(saved)
    holder = saved
    for key in path[:-1]:
        holder = holder[key]
    holder.pop(path[-1])
    return saved


@pytest.mark.parametrize(
    "name, change, says",
    [
        ("checkpoint.pth", lambda s: without(s, "config", "classes"), "lacks the settings"),
        ("checkpoint.pth", lambda s: without(s, "config", "precision"), "lacks the settings"),
        ("checkpoint.pth", lambda s: {**s, "history": []}, "does not fit this run"),
        ("checkpoint.pth", lambda s: {**s, "rng": ["not a state"]}, "does not fit this run"),
        ("checkpoint.pth", lambda s: {**s, "optimizer": {"state": {}}}, "does not fit this run"),
        ("checkpoint.pth", lambda s: {**s, "trained": {"head.weight": 1}}, "does not fit this"),
        ("adapters.pth", lambda s: without(s, "config", "classes"), "lacks the settings"),
        ("adapters.pth", lambda s: {**s, "config": []}, "lacks the settings"),
        ("adapters.pth", lambda s: {**s, "state_dict": {}}, "does not fit this model"),
        ("folded.pth", lambda s: {**s, "state_dict": {"x": torch.zeros(1)}}, "does not fit"),
    ],
)
def test_files_that_load_but_hold_another_structure_get_one_line(
    finished_run, tmp_path, capsys, name, change, says
):
    out, _ = finished_run
    copy_of_run = tmp_path / "run"
    shutil.copytree(out, copy_of_run)
    torch.save(change(torch.load(out / name, weights_only=True)), copy_of_run / name)
    if name == "checkpoint.pth":
        os.remove(copy_of_run / "adapters.pth")  # not finished: --resume reads its checkpoint
        args = ["--resume", copy_of_run, "--workers", "0"]
    else:
        args = ["--eval-only", "--checkpoint", copy_of_run / name, "--workers", "0"]
    fails_with_one_line(args, capsys, copy_of_run / name, says)


def test_eval_only_refuses_settings_it_cannot_change_and_states_the_ones_it_uses(
    finished_run, capsys
):
    out, _ = finished_run
    args = ["--eval-only", "--checkpoint", out / "adapters.pth", "--workers", "0"]
    fails_with_one_line([*args, "--img-size", "64"], capsys, "--img-size 32 there, 64 here")
    fails_with_one_line([*args, "--lr", "0.5"], capsys, "--lr", "0.5 here")
    assert run_train(*args, "--batch-size", "3", "--precision", "fp32") == 0
    assert "batch 12, fp32: test accuracy" in capsys.readouterr().out  # 4 x --batch-size
