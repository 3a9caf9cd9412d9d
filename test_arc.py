"""Tests for ARC, the ViT and Swin models, the data readers and train.py. Run: python -m pytest

Tiny model configs test behaviour; full-size configs appear only where size matters (parameter
counts against the paper, checkpoint shapes). Nothing here needs a GPU or the network.
"""
import copy

import numpy as np
import pytest
import torch

import arc
import vit


def tiny_vit(**kw):
    return vit.VisionTransformer(patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, img_size=32, **kw)


def randomize_arc(model, seed=0):
    """Give every ARC tensor and the head non-zero values, so folding has something to fold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in arc.arc_state_dict(model).items():
            model.get_parameter(name).copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------------
# ARC on the ViT: parameter counts, folding


def test_vit_b16_trainable_parameters_match_the_paper():
    # 2*(768*50) + 12*2*(50+768) + (768*47+47) and 768*50 + 12*(50+768) + 36,143 (ARC.md section 1)
    assert arc.mark_trainable(vit.vit_b16(num_classes=47, arc="arc")) == 132_575
    assert arc.mark_trainable(vit.vit_b16(num_classes=47, arc="arc_att")) == 84_359


def test_mark_trainable_freezes_the_backbone():
    model = tiny_vit(num_classes=5, arc="arc")
    arc.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"down_proj_att.weight", "down_proj_ffn.weight", "head.weight", "head.bias"} | {
        f"blocks.{i}.adapter_{pos}.{t}" for i in range(2) for pos in ("att", "ffn") for t in ("scale", "bias")}


def test_official_initialisation():
    model = vit.vit_b16(num_classes=47, arc="arc")
    bound = (6 / (768 + 50)) ** 0.5  # xavier-uniform on (d, r)
    assert 0.9 * bound < model.down_proj_att.weight.abs().max() <= bound
    block = model.blocks[3]
    assert torch.all(block.adapter_att.scale == 0) and torch.all(block.adapter_att.bias == 0)
    assert 0 < block.adapter_ffn.scale.abs().max() <= (6 / 51) ** 0.5  # xavier-uniform on (1, r)
    assert torch.all(model.head.weight == 0)
    assert model.blocks[0].adapter_att.down_proj is model.blocks[11].adapter_att.down_proj  # shared


@pytest.mark.parametrize("method", ["arc", "arc_att"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_folding_is_exact(method, dtype, tol):
    model = randomize_arc(tiny_vit(num_classes=5, arc=method)).to(dtype).eval()
    images = torch.randn(4, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        unfolded = model(images)
        folded_model = arc.reparameterize(copy.deepcopy(model))
        folded = folded_model(images)
        plain = tiny_vit(num_classes=5).to(dtype).eval()
        plain.load_state_dict(folded_model.state_dict(), strict=True)
        assert (folded - unfolded).abs().max() < tol
        assert (plain(images) - unfolded).abs().max() < tol
    assert unfolded.abs().max() > 0.1  # the comparison is not between zeros
    assert not any(arc.is_arc(m) for m in folded_model.modules())


def test_adapters_change_the_output_and_dropout_acts_in_training():
    model = randomize_arc(tiny_vit(num_classes=5, arc="arc", adapter_dropout=0.5))
    images = torch.randn(2, 3, 32, 32)
    plain = tiny_vit(num_classes=5)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        assert (model.eval()(images) - plain.eval()(images)).abs().max() > 1e-3
        torch.manual_seed(0)
        assert (model.train()(images) - model.eval()(images)).abs().max() > 1e-3


def test_adapter_checkpoint_is_small_and_reloads(tmp_path):
    model = randomize_arc(vit.vit_b16(num_classes=47, arc="arc")).eval()
    path = tmp_path / "adapters.pth"
    torch.save(arc.arc_state_dict(model), path)
    assert path.stat().st_size < 600_000  # 132,575 float32 values and their names
    fresh = vit.vit_b16(num_classes=47, arc="arc").eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in arc.arc_state_dict(model)},
                          strict=False)  # the same frozen backbone, as after load_pretrained
    arc.load_arc_state_dict(fresh, torch.load(path))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    with pytest.raises(ValueError, match="does not fit"):
        arc.load_arc_state_dict(vit.vit_b16(num_classes=47, arc="arc_att"), torch.load(path))


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="arc must be"):
        tiny_vit(arc="lora")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.vit_b16(img_size=200)


# ---------------------------------------------------------------------------------------------------
# Loading the published checkpoints


def write_google_npz(path, dim, depth, heads, mlp_dim, patch, classes, grid, prefix="", seed=0):
    """A ViT checkpoint in Google's .npz names and layouts (ARC.md section 5), random values."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1
    head_dim = dim // heads
    arrays = {"embedding/kernel": rand(patch, patch, 3, dim), "embedding/bias": rand(dim), "cls": rand(1, 1, dim),
              "Transformer/posembed_input/pos_embedding": rand(1, 1 + grid * grid, dim),
              "Transformer/encoder_norm/scale": 1 + rand(dim), "Transformer/encoder_norm/bias": rand(dim),
              "head/kernel": rand(dim, classes), "head/bias": rand(classes),
              "pre_logits/kernel": rand(dim, dim), "pre_logits/bias": rand(dim)}
    for i in range(depth):
        block, att = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}{norm}/scale"], arrays[f"{block}{norm}/bias"] = 1 + rand(dim), rand(dim)
        for name in ("query", "key", "value"):
            arrays[f"{att}{name}/kernel"], arrays[f"{att}{name}/bias"] = rand(dim, heads, head_dim), rand(heads, head_dim)
        arrays[f"{att}out/kernel"], arrays[f"{att}out/bias"] = rand(heads, head_dim, dim), rand(dim)
        arrays[f"{block}MlpBlock_3/Dense_0/kernel"], arrays[f"{block}MlpBlock_3/Dense_0/bias"] = rand(dim, mlp_dim), rand(mlp_dim)
        arrays[f"{block}MlpBlock_3/Dense_1/kernel"], arrays[f"{block}MlpBlock_3/Dense_1/bias"] = rand(mlp_dim, dim), rand(dim)
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    return arrays


def assert_loaded_like_google(model, arrays):
    """Each loaded tensor computes what the .npz array computes in Google's (in, out) convention."""
    t = lambda name: torch.from_numpy(arrays[name])
    block, att = model.blocks[-1], f"Transformer/encoderblock_{len(model.blocks) - 1}/MultiHeadDotProductAttention_1/"
    with torch.no_grad():
        patch = torch.randn(1, 3, model.patch_size, model.patch_size)
        expected = torch.einsum("chw,hwco->o", patch[0], t("embedding/kernel")) + t("embedding/bias")
        assert torch.allclose(model.patch_embed.proj(patch).flatten(), expected, atol=1e-5)
        x = torch.randn(t("cls").shape[-1])
        qkv = block.attn.qkv(x).chunk(3)
        for out, name in zip(qkv, ("query", "key", "value")):
            expected = torch.einsum("d,dhk->hk", x, t(f"{att}{name}/kernel")) + t(f"{att}{name}/bias")
            assert torch.allclose(out, expected.flatten(), atol=1e-5)
        heads = t(f"{att}out/kernel").shape[0]
        expected = torch.einsum("hk,hkd->d", x.view(heads, -1), t(f"{att}out/kernel")) + t(f"{att}out/bias")
        assert torch.allclose(block.attn.proj(x), expected, atol=1e-5)
        mlp = f"Transformer/encoderblock_{len(model.blocks) - 1}/MlpBlock_3/"
        assert torch.allclose(block.mlp.fc1(x), x @ t(mlp + "Dense_0/kernel") + t(mlp + "Dense_0/bias"), atol=1e-5)
        assert torch.equal(block.norm2.weight, t(f"Transformer/encoderblock_{len(model.blocks) - 1}/LayerNorm_2/scale"))
        assert torch.equal(model.cls_token, t("cls"))
        assert torch.equal(model.norm.bias, t("Transformer/encoder_norm/bias"))


def test_full_size_google_npz_loads_into_vit_b16(tmp_path, capsys):
    # Every name and shape of the published imagenet21k/ViT-B_16.npz, pre_logits and 21843-class head included.
    arrays = write_google_npz(tmp_path / "ViT-B_16.npz", 768, 12, 12, 3072, 16, 21843, 14)
    assert arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (768, 12, 64)
    model = vit.load_pretrained(vit.vit_b16(num_classes=47, arc="arc"), tmp_path / "ViT-B_16.npz")
    assert_loaded_like_google(model, arrays)
    assert torch.all(model.head.weight == 0) and "head not loaded" in capsys.readouterr().out
    model = vit.load_pretrained(vit.vit_b16(num_classes=21843), tmp_path / "ViT-B_16.npz")
    assert torch.equal(model.head.weight, torch.from_numpy(arrays["head/kernel"]).T)


@pytest.mark.parametrize("prefix", ["", "opt/target/", "params/"])
def test_google_npz_with_prefix_loads(tmp_path, prefix):
    arrays = write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4, prefix=prefix)
    model = vit.load_pretrained(tiny_vit(num_classes=5, arc="arc"), tmp_path / "w.npz")
    assert_loaded_like_google(model, arrays)
    assert torch.equal(model.pos_embed, torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"]))


def test_timm_layout_state_dict_round_trips(tmp_path):
    source = randomize_arc(tiny_vit(num_classes=5))  # a plain ViT with random weights everywhere
    torch.save({"model": source.state_dict()}, tmp_path / "timm.pth")
    model = vit.load_pretrained(tiny_vit(num_classes=5, arc="arc"), tmp_path / "timm.pth")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_position_embeddings_are_resized_for_another_image_size(tmp_path, capsys):
    arrays = write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4)
    pos = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
    model = vit.load_pretrained(vit.VisionTransformer(8, 32, 2, 2, 64, num_classes=5, img_size=64), tmp_path / "w.npz")
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(model.pos_embed[:, 0], pos[:, 0])  # the class token's embedding is kept
    grid = model.pos_embed[0, 1:].view(8, 8, 32)
    assert torch.allclose(grid[::2, ::2].mean(), pos[0, 1:].mean(), atol=0.05)  # an interpolation, not noise
    assert "resized from 16 to 64 patches" in capsys.readouterr().out


def test_bad_weight_files_fail_with_a_clear_error(tmp_path):
    write_google_npz(tmp_path / "large.npz", 48, 2, 2, 64, 8, 5, 4)  # wider: another model size
    with pytest.raises(arc.CheckpointError, match=r"large\.npz does not fit.*patch_embed\.proj\.weight \(48, 3, 8, 8\) vs \(32, 3, 8, 8\)"):
        vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "large.npz")
    torch.save({"layers.0.blocks.0.attn.qkv.weight": torch.zeros(3)}, tmp_path / "swin.pth")
    with pytest.raises(arc.CheckpointError, match=r"swin\.pth does not fit.*missing \['cls_token'"):
        vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "swin.pth")
    with pytest.raises(arc.CheckpointError, match="no such file"):
        vit.load_pretrained(tiny_vit(), tmp_path / "absent.npz")
    write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:5000])
    with pytest.raises(arc.CheckpointError, match=r"cut\.npz: unreadable"):
        vit.load_pretrained(tiny_vit(), tmp_path / "cut.npz")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(arc.CheckpointError, match=r"text\.pth: unreadable"):
        vit.load_pretrained(tiny_vit(), tmp_path / "text.pth")
