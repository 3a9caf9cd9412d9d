"""Tests that run README.md's examples as they are written."""

import os
import re

import torch
import torchvision
from PIL import Image

import arc
import data
from conftest import (
    HERE,
)

# --------------------------------------------------------------------------------------------------
# The README's examples, run as they are written


def test_the_readme_example_on_a_torchvision_model_runs(tmp_path, monkeypatch, capsys):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        example = re.search(
            r"## ARC on a model you already have.*?With torchvision.*?```python\n(.*?)```",
            f.read(),
            re.S,
        )[1]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(
        example.replace('weights="IMAGENET1K_V1"', "weights=None"), namespace
    )  # no download in the tests
    assert capsys.readouterr().out == "132575\n"
    model = namespace["model"]
    assert type(model) is torchvision.models.VisionTransformer and not any(
        arc.is_arc(m) for m in model.modules()
    )
    assert set(torch.load("adapters.pth")) == {
        "encoder.down_proj_att.weight",
        "encoder.down_proj_ffn.weight",
        "heads.head.weight",
        "heads.head.bias",
    } | {
        f"encoder.layers.encoder_layer_{i}.adapter_{side}.{t}"
        for i in range(12)
        for side in ("att", "ffn")
        for t in ("scale", "bias")
    }
    torchvision.models.vit_b_16(num_classes=47).load_state_dict(
        torch.load("vit_b_16_arc.pth"), strict=True
    )


def test_the_folded_model_example_in_the_readme_runs(synthetic_run, tmp_path, monkeypatch, capsys):
    with open(os.path.join(HERE, "README.md")) as f:
        example = re.search(r"## Using the trained model.*?```python\n(.*?)```", f.read(), re.S)[1]
    images = tmp_path / "my_photos"
    task = data.build("synthetic", img_size=16, log=None)
    images.mkdir()
    for i in (0, 25, 150):  # test images of classes 0, 1 and 7
        Image.fromarray(task.test.images[i].permute(1, 2, 0).numpy()).save(images / f"{i}.png")
    example = example.replace("runs/dtd_vit_b16_arc", str(synthetic_run)).replace(
        "my_photos", str(images)
    )
    monkeypatch.chdir(HERE)
    exec(example, {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"{images / '0.png'}: class 0",
        f"{images / '150.png'}: class 7",
        f"{images / '25.png'}: class 1",
    ]
