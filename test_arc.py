"""Tests of the method: arc.py (parameter counts, initialisation, folding, add_adapters on every
model family), the models vit.py and swin.py, their weight loaders, and parity with the official ARC
code, timm and Microsoft.
"""

import copy
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import arc
import swin
import vit
from conftest import (
    ARC_RANK,
    HERE,
    LayerScale,
    TimmStyleBlock,
    TimmStyleViT,
    randomize_arc,
    randomize_swin,
    swin_tiny,
    tiny_vit,
    write_google_npz,
)

# --------------------------------------------------------------------------------------------------
# The method (arc.py): parameter counts, initialisation, folding, add_adapters on every model
# family, its errors


def is_arc_or_head(name):
    return "adapter" in name or "down_proj" in name or name.startswith("head.")


class TimmStyleSwin(torch.nn.Module):
    """timm's SwinTransformer by its names: layers.{s}.downsample at the start of stages 1-2,
    layers.{s}.blocks.{j}, head.fc. Its blocks attend over all tokens, not windows: add_adapters
    sees only names and widths."""

    def __init__(self, dim=16, depths=(2, 2, 2)):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, 8, 8)
        self.layers = torch.nn.Sequential()
        for s, depth in enumerate(depths):
            stage = torch.nn.Sequential()
            stage.downsample = (
                torch.nn.Linear(dim * 2 ** (s - 1), dim * 2**s) if s else torch.nn.Identity()
            )
            stage.blocks = torch.nn.Sequential(
                *[TimmStyleBlock(dim * 2**s, 2) for _ in range(depth)]
            )
            self.layers.append(stage)
        self.norm, self.head = torch.nn.LayerNorm(dim * 2**s), torch.nn.Module()
        self.head.fc = torch.nn.Linear(dim * 2**s, 5)

    def forward(self, images):
        x = self.layers(self.patch_embed.proj(images).flatten(2).transpose(1, 2))
        return self.head.fc(self.norm(x).mean(1))


class HFStyleAttention(torch.nn.Module):
    """transformers 5's ViTAttention by its names: three projections fed the same tokens, and
    o_proj."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            torch.nn.Linear(dim, dim) for _ in range(4)
        )

    def forward(self, hidden_states):
        B, N, C = hidden_states.shape

        def split(t):
            return t.view(B, N, self.heads, -1).transpose(1, 2)

        q = split(self.q_proj(hidden_states))
        k = split(self.k_proj(hidden_states))
        v = split(self.v_proj(hidden_states))
        return self.o_proj(
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            .transpose(1, 2)
            .reshape(B, N, C)
        )


class HFStyleLayer(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attention, self.mlp = HFStyleAttention(dim), vit.Mlp(dim, 2 * dim)
        self.layernorm_before, self.layernorm_after = (
            torch.nn.LayerNorm(dim),
            torch.nn.LayerNorm(dim),
        )

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attention(self.layernorm_before(hidden_states))
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))


class HF4StyleLayer(torch.nn.Module):
    """transformers 4's ViTLayer by its names (as in 4.57): attention.attention.{query,key,value},
    attention.output.dense, intermediate.dense, output.dense."""

    def __init__(self, dim):
        super().__init__()
        self.attention, self.intermediate, self.output = (
            torch.nn.Module(),
            torch.nn.Module(),
            torch.nn.Module(),
        )
        self.attention.attention, self.attention.output = torch.nn.Module(), torch.nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.attention, name, torch.nn.Linear(dim, dim))
        self.attention.output.dense = torch.nn.Linear(dim, dim)
        self.intermediate.dense, self.output.dense = (
            torch.nn.Linear(dim, 2 * dim),
            torch.nn.Linear(2 * dim, dim),
        )
        self.layernorm_before, self.layernorm_after = (
            torch.nn.LayerNorm(dim),
            torch.nn.LayerNorm(dim),
        )

    def forward(self, hidden_states):
        h, attention = self.layernorm_before(hidden_states), self.attention.attention
        B, N, C = h.shape

        def split(t):
            return t.view(B, N, 2, -1).transpose(1, 2)

        mixed = torch.nn.functional.scaled_dot_product_attention(
            split(attention.query(h)), split(attention.key(h)), split(attention.value(h))
        ).transpose(1, 2)
        hidden_states = hidden_states + self.attention.output.dense(mixed.reshape(B, N, C))
        h = torch.nn.functional.gelu(self.intermediate.dense(self.layernorm_after(hidden_states)))
        return hidden_states + self.output.dense(h)


class HFStyleViT(torch.nn.Module):
    """transformers' ViTForImageClassification by its names: vit.embeddings, vit.layers.{i} (version
    5) or vit.encoder.layer.{i} (version 4), vit.layernorm, classifier."""

    def __init__(self, dim=32, depth=3, version=5):
        super().__init__()
        self.vit = torch.nn.Module()
        self.vit.embeddings = torch.nn.Conv2d(3, dim, 8, 8)
        layers = torch.nn.ModuleList(
            (HFStyleLayer if version == 5 else HF4StyleLayer)(dim) for _ in range(depth)
        )
        if version == 5:
            self.vit.layers = layers
        else:
            self.vit.encoder = torch.nn.Module()
            self.vit.encoder.layer = layers
        self.vit.layernorm, self.classifier = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 5)

    def forward(self, pixel_values):
        x = self.vit.embeddings(pixel_values).flatten(2).transpose(1, 2)
        for layer in self.vit.layers if hasattr(self.vit, "layers") else self.vit.encoder.layer:
            x = layer(x)
        return self.classifier(self.vit.layernorm(x)[:, 0])


def _torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=[4, 4],
        num_classes=5,
    )


def _put(root, name, module):
    """Register `module` under `root` at the dotted `name`, making the parents on the way (a
    ModuleList where numbered children follow)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root
    parts = parent_name.split(".") if parent_name else []
    for i, part in enumerate(parts):
        if not hasattr(parent, part):
            numbered = (parts + [leaf])[i + 1].isdigit()
            parent.add_module(part, torch.nn.ModuleList() if numbered else torch.nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


class LayoutBlock(torch.nn.Module):
    """A pre-norm ViT block whose modules bear a library's names: `names` maps the roles norm1, q,
    k, v, proj, norm2, fc1, fc2 (and ls1, ls2: LayerScale) to dotted names, in the library's order
    of registration. key_bias=False: a key projection without bias (BEiT, Data2Vec-vision)."""

    def __init__(self, dim, names, key_bias=True):
        super().__init__()
        self.names = names
        for role, name in names.items():
            if role.startswith("norm"):
                module = torch.nn.LayerNorm(dim)
            elif role.startswith("ls"):
                module = LayerScale(dim)
            elif role == "fc1":
                module = torch.nn.Linear(dim, 2 * dim)
            elif role == "fc2":
                module = torch.nn.Linear(2 * dim, dim)
            else:
                module = torch.nn.Linear(dim, dim, bias=key_bias or role != "k")
            _put(self, name, module)

    def role(self, role):
        return self.get_submodule(self.names[role]) if role in self.names else torch.nn.Identity()

    def forward(self, x):
        B, N, C = x.shape
        h = self.role("norm1")(x)
        q, k, v = (self.role(r)(h).view(B, N, 2, -1).transpose(1, 2) for r in "qkv")
        mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        x = x + self.role("ls1")(self.role("proj")(mixed.reshape(B, N, C)))
        h = torch.nn.functional.gelu(self.role("fc1")(self.role("norm2")(x)))
        return x + self.role("ls2")(self.role("fc2")(h))


class AttentionPool(torch.nn.Module):
    """SigLIP's attention-pooling head (probe, attention, layernorm, mlp): part of the backbone."""

    def __init__(self, dim):
        super().__init__()
        self.probe = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.attention = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.layernorm = torch.nn.LayerNorm(dim)
        self.mlp = vit.Mlp(dim, 2 * dim)

    def forward(self, x):
        pooled = self.attention(self.probe.expand(len(x), -1, -1), x, x)[0][:, 0]
        return pooled + self.mlp(self.layernorm(pooled))


class OpenClipBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock: ln_1, attn (an nn.MultiheadAttention called as (x, x,
    x)), ln_2, mlp.c_fc, mlp.c_proj."""

    def __init__(self, dim):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential()
        self.mlp.c_fc = torch.nn.Linear(dim, 2 * dim)
        self.mlp.gelu = torch.nn.GELU()
        self.mlp.c_proj = torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class LayoutModel(torch.nn.Module):
    """A transformer whose modules bear a library's names. `sequence`: (dotted name, module) in the
    order that forward applies them to the tokens; `heads`: the names of its classifiers (their
    logits add up; none: it returns the pooled tokens); `pool`: SigLIP's attention-pooling head.
    `extra`: modules that forward never calls (CLIP's text tower)."""

    def __init__(self, sequence, heads=("classifier",), pool=None, extra=(), widths=(32, 32)):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, widths[0], 8, 8)
        self.order = [name for name, _ in sequence]
        for name, module in [*sequence, *extra]:
            _put(self, name, module)
        self.final_norm = torch.nn.LayerNorm(widths[-1])
        self.head_names = list(heads)
        self.pool_name = pool
        for name in heads:
            _put(self, name, torch.nn.Linear(widths[-1], 5))
        if pool:
            _put(self, pool, AttentionPool(widths[-1]))

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        for name in self.order:
            x = self.get_submodule(name)(x)
        x = self.final_norm(x)
        pooled = self.get_submodule(self.pool_name)(x) if self.pool_name else x.mean(1)
        if not self.head_names:
            return pooled
        return sum(self.get_submodule(name)(pooled) for name in self.head_names)


# Block layouts by role (see LayoutBlock), read off transformers 5.25
HF_VIT = {
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "proj": "attention.o_proj",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
HF_DINOV2 = {
    "norm1": "norm1",
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "proj": "attention.o_proj",
    "ls1": "layer_scale1",
    "norm2": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "ls2": "layer_scale2",
}
HF_CLIP = {
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "q": "self_attn.q_proj",
    "proj": "self_attn.out_proj",
    "norm1": "layer_norm1",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "norm2": "layer_norm2",
}
HF_4 = {  # transformers 4's names, which Data2Vec-vision keeps in 5.25
    "q": "attention.attention.query",
    "k": "attention.attention.key",
    "v": "attention.attention.value",
    "proj": "attention.output.dense",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
}


def _stack(prefix, names, depth=3, width=32, key_bias=True):
    return [(f"{prefix}.{i}", LayoutBlock(width, names, key_bias)) for i in range(depth)]


def _hf_swin():
    """transformers' SwinForImageClassification by its names; its blocks attend over all tokens."""
    stages = [
        *_stack("swin.encoder.layers.0.blocks", HF_VIT, 2, 16),
        ("swin.encoder.layers.0.downsample", torch.nn.Linear(16, 32)),
        *_stack("swin.encoder.layers.1.blocks", HF_VIT, 2, 32),
    ]
    return LayoutModel(stages, widths=(16, 32))


def _open_clip(prefix="", text=False):
    """open_clip's VisionTransformer, or with prefix "visual." and text=True its CLIP model."""
    resblocks = [(f"{prefix}transformer.resblocks.{i}", OpenClipBlock(32)) for i in range(3)]
    text_tower = [(f"transformer.resblocks.{i}", OpenClipBlock(32)) for i in range(2) if text]
    return LayoutModel(resblocks, heads=(), extra=text_tower)


class BeitAttention(vit.Attention):
    """timm's BEiT (and EVA) attention: qkv without bias; its own q_bias and v_bias and a zero
    k_bias buffer, applied with F.linear; a relative position bias on the logits."""

    def __init__(self, dim, heads, tokens=17):
        super().__init__(dim, heads)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = torch.nn.Parameter(torch.randn(dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = torch.nn.Parameter(torch.randn(dim) * 0.1)
        self.relative_position_bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens))
        self.window_size = (4, 4)  # timm's has one, as torchvision's Swin attention: told apart

    def forward(self, x):
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = torch.nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mixed = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=self.relative_position_bias
        )
        return self.proj(mixed.transpose(1, 2).reshape(B, N, C))


class RotaryEmbeddingCat(torch.nn.Module):
    """timm's EVA-02 rotary position embeddings, by the class name that add_adapters looks for."""


def _timm_beit(rotary=False):
    model = TimmStyleViT()
    for block in model.blocks:
        block.attn = BeitAttention(32, 2)
    if rotary:  # EVA-02
        model.rope = RotaryEmbeddingCat()
    return model


class DistilledViT(TimmStyleViT):
    """timm's VisionTransformerDistilled (deit_*_distilled_*): `head` on the class token,
    `head_dist` on the distillation token; in eval, the mean of their logits."""

    def __init__(self):
        super().__init__(registers=1)  # the distillation token, where a register would be
        self.head_dist = torch.nn.Linear(32, 5)

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = torch.cat([x[:, :1], self.reg_token.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        x = self.norm(self.blocks(x))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


ARC_FAMILIES = {  # name -> (a small model, its input size, [(width, blocks of that width)])
    "timm ViT": (TimmStyleViT, 32, [(32, 3)]),
    "timm DINOv2 (LayerScale, registers)": (
        lambda: TimmStyleViT(layer_scale=True, registers=2),
        32,
        [(32, 3)],
    ),
    "timm Swin": (TimmStyleSwin, 32, [(16, 2), (32, 2), (64, 2)]),
    "torchvision ViT": (
        lambda: torchvision.models.VisionTransformer(32, 8, 3, 2, 32, 64, num_classes=5),
        32,
        [(32, 3)],
    ),
    "torchvision Swin": (_torchvision_swin, 32, [(16, 2), (32, 2)]),
    "transformers ViT": (HFStyleViT, 32, [(32, 3)]),
    "transformers 4 ViT": (lambda: HFStyleViT(version=4), 32, [(32, 3)]),
    "vit.py": (lambda: tiny_vit(num_classes=5), 32, [(32, 2)]),
    "swin.py": (lambda: swin_tiny(), 64, [(16, 2), (32, 2), (64, 2)]),
    "timm BEiT (q and v biases of its own)": (_timm_beit, 32, [(32, 3)]),
    "timm DeiT distilled (head, head_dist)": (DistilledViT, 32, [(32, 3)]),
    "transformers Dinov2Model": (
        lambda: LayoutModel(_stack("encoder.layer", HF_DINOV2), heads=()),
        32,
        [(32, 3)],
    ),
    "transformers Dinov2ForImageClassification": (
        lambda: LayoutModel(_stack("dinov2.encoder.layer", HF_DINOV2)),
        32,
        [(32, 3)],
    ),
    "transformers CLIPVisionModel": (
        lambda: LayoutModel(_stack("encoder.layers", HF_CLIP), heads=()),
        32,
        [(32, 3)],
    ),
    "transformers CLIPModel (text tower left alone)": (
        lambda: LayoutModel(
            _stack("vision_model.encoder.layers", HF_CLIP),
            heads=(),
            extra=_stack("text_model.encoder.layers", HF_CLIP, 2),
        ),
        32,
        [(32, 3)],
    ),
    "transformers SiglipVisionModel (attention pooling frozen)": (
        lambda: LayoutModel(_stack("encoder.layers", HF_CLIP), heads=(), pool="head"),
        32,
        [(32, 3)],
    ),
    "transformers SwinForImageClassification": (_hf_swin, 32, [(16, 2), (32, 2)]),
    "transformers DeiTForImageClassification": (
        lambda: LayoutModel(_stack("deit.layers", HF_VIT)),
        32,
        [(32, 3)],
    ),
    "transformers DeiTForImageClassificationWithTeacher": (
        lambda: LayoutModel(
            _stack("deit.layers", HF_VIT), heads=("cls_classifier", "distillation_classifier")
        ),
        32,
        [(32, 3)],
    ),
    "transformers ViTMAEModel": (
        lambda: LayoutModel(_stack("layers", HF_VIT), heads=()),
        32,
        [(32, 3)],
    ),
    "transformers BeitForImageClassification (no key bias)": (
        lambda: LayoutModel(_stack("beit.layers", HF_VIT, key_bias=False)),
        32,
        [(32, 3)],
    ),
    "transformers Data2VecVisionForImageClassification (no key bias)": (
        lambda: LayoutModel(_stack("data2vec_vision.encoder.layer", HF_4, key_bias=False)),
        32,
        [(32, 3)],
    ),
    "open_clip VisionTransformer": (_open_clip, 32, [(32, 3)]),
    "open_clip CLIP (text tower left alone)": (
        lambda: _open_clip("visual.", text=True),
        32,
        [(32, 3)],
    ),
}


def _head(family):
    """What mark_trainable trains as a family's head: a model without a classifier has none."""
    modules = dict(ARC_FAMILIES[family][0]().named_modules())
    has_head = any(isinstance(modules.get(name), torch.nn.Linear) for name in arc.HEADS)
    return "auto" if has_head else None


def _layer_weight(layer):
    return layer.in_proj_weight if isinstance(layer, torch.nn.MultiheadAttention) else layer.weight


def _feeds(model, adapter_name):
    """The layers that the adapter of this name feeds, as its block says."""
    block_name, _, attribute = adapter_name.rpartition(".")
    block = model.get_submodule(block_name)
    return [block.get_submodule(name) for name in block.adapter_feeds[attribute]]


def _arc_on(family, method="arc", dropout=0.1):
    """(the plain model, a copy with ARC, its non-zero ARC tensors, in eval mode; input images) of a
    family."""
    build, size, _ = ARC_FAMILIES[family]
    torch.manual_seed(0)
    plain = build().eval()
    with torch.no_grad():
        # the head alone; some start at zero, which would hide everything
        for name in arc.arc_state_dict(plain, _head(family)):
            plain.get_parameter(name).normal_(0, 0.5)
    model = arc.add_adapters(copy.deepcopy(plain), rank=ARC_RANK, method=method, dropout=dropout)
    with torch.no_grad():
        for name in arc.arc_state_dict(model, head=None):
            model.get_parameter(name).normal_(0, 0.3)
    return plain, model, torch.randn(2, 3, size, size)


class FunctionalAttention(vit.Attention):
    """Uses its qkv layer's weight with F.linear, never calling the layer (as torchvision's Swin
    attention does)."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            .transpose(1, 2)
            .reshape(B, N, C)
        )


def test_vit_b16_trainable_parameters_match_the_paper():
    # 2*(768*50) + 12*2*(50+768) + (768*47+47) and 768*50 + 12*(50+768) + 36,143 (ARC.md section 1)
    assert arc.mark_trainable(vit.vit_b16(num_classes=47, arc="arc")) == 132_575
    assert arc.mark_trainable(vit.vit_b16(num_classes=47, arc="arc_att")) == 84_359


def test_swin_b_arc_parameter_counts():
    dims = [128, 256, 512, 1024]  # Swin-B's stage widths and depths, r = 50, 47 classes
    depths = [2, 2, 18, 2]
    r = 50
    classes = 47
    head = dims[-1] * classes + classes
    for method, sides in (("arc", 2), ("arc_att", 1)):
        expected = sides * sum(
            d * r + L * (r + d) for d, L in zip(dims, depths, strict=True)
        )  # per-stage W, per-block c, b
        model = swin.swin_b(num_classes=classes, arc=method, rank=r)
        assert sum(v.numel() for v in arc.arc_state_dict(model, head=None).values()) == expected
        assert arc.mark_trainable(model) == expected + head
    assert (
        expected == 109_232 and 2 * expected == 218_464
    )  # the paper's 0.27M with the 47-class head


def test_mark_trainable_freezes_the_backbone():
    model = tiny_vit(num_classes=5, arc="arc")
    arc.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "down_proj_att.weight",
        "down_proj_ffn.weight",
        "head.weight",
        "head.bias",
    } | {
        f"blocks.{i}.adapter_{pos}.{t}"
        for i in range(2)
        for pos in ("att", "ffn")
        for t in ("scale", "bias")
    }


def test_official_initialisation():
    model = vit.vit_b16(num_classes=47, arc="arc")
    bound = (6 / (768 + 50)) ** 0.5  # xavier-uniform on (d, r)
    assert 0.9 * bound < model.down_proj_att.weight.abs().max() <= bound
    block = model.blocks[3]
    assert torch.all(block.adapter_att.scale == 0) and torch.all(block.adapter_att.bias == 0)
    assert 0 < block.adapter_ffn.scale.abs().max() <= (6 / 51) ** 0.5  # xavier-uniform on (1, r)
    assert torch.all(model.head.weight == 0)
    assert model.blocks[0].adapter_att.down_proj is model.blocks[11].adapter_att.down_proj  # shared


@pytest.mark.parametrize(
    "dropout", [0.0, 0.3]
)  # ViT dropout: no parameters, the identity in eval mode
@pytest.mark.parametrize("method", ["arc", "arc_att"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_folding_is_exact(method, dtype, tol, dropout):
    torch.manual_seed(0)  # the same model and images whatever ran before
    model = randomize_arc(tiny_vit(num_classes=5, arc=method, dropout=dropout)).to(dtype).eval()
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


@pytest.mark.parametrize("drop_path", [0.0, 0.3])  # no parameters, the identity in eval mode
@pytest.mark.parametrize(
    "img_size", [64, 32]
)  # 32 px: the last map (2x2) is smaller than the window
@pytest.mark.parametrize("method", ["arc", "arc_att"])
def test_swin_folding_is_exact(method, img_size, drop_path):
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        model = randomize_swin(
            swin_tiny(arc=method, rank=6, img_size=img_size, drop_path=drop_path), is_arc_or_head
        )
        model = model.to(dtype).eval()
        x = torch.randn(3, 3, img_size, img_size, dtype=dtype)
        with torch.no_grad():
            adapted = model(x)
            folded = arc.reparameterize(model)(x)
            plain = swin_tiny(img_size=img_size).to(dtype).eval()
            plain.load_state_dict(model.state_dict(), strict=True)
            assert (folded - adapted).abs().max() < tol
            assert (plain(x) - adapted).abs().max() < tol
            assert adapted.std() > 0.1  # the adapters and head really do something


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
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in arc.arc_state_dict(model)},
        strict=False,
    )  # the same frozen backbone, as after load_pretrained
    arc.load_arc_state_dict(fresh, torch.load(path))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    with pytest.raises(ValueError, match="does not fit"):
        arc.load_arc_state_dict(vit.vit_b16(num_classes=47, arc="arc_att"), torch.load(path))


@pytest.mark.parametrize("method", ["arc", "arc_att"])
@pytest.mark.parametrize("family", list(ARC_FAMILIES))
def test_add_adapters_counts_acts_and_folds_back_into_the_original_model(family, method):
    build, _, widths = ARC_FAMILIES[family]
    plain, model, images = _arc_on(family, method)
    head = sum(v.numel() for v in arc.arc_state_dict(plain, _head(family)).values())
    positions = arc.METHODS[method]  # 2 (d r + L (r + d)) per width for arc, half for arc_att
    assert (
        arc.mark_trainable(model, _head(family))
        == len(positions) * sum(d * ARC_RANK + L * (ARC_RANK + d) for d, L in widths) + head
    )
    fed = [
        (
            name.rpartition("_")[2],
            adapter.bias.numel(),
            [(_layer_weight(layer), _layer_weight(layer).clone()) for layer in _feeds(model, name)],
        )
        for name, adapter in model.named_modules()
        if isinstance(adapter, arc.ARCAdapter)
    ]
    with torch.no_grad():
        reference, adapted = plain(images), model(images)
        assert (adapted - reference).abs().max() > 0.05 * reference.abs().max()  # the adapters act
        folded = arc.reparameterize(model)
        assert (folded(images) - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    assert type(folded) is type(plain) and list(folded.state_dict()) == list(plain.state_dict())
    assert [name for name, _ in folded.named_modules()] == [
        name for name, _ in plain.named_modules()
    ]
    assert not any(
        m._forward_pre_hooks or m._forward_hooks for m in folded.modules()
    )  # every hook removed
    fresh = build().eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    # alike but for the weights: nn.MultiheadAttention computes differently for frozen ones
    fresh.requires_grad_(False)
    folded.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(fresh(images), folded(images))
    # the weight changes at one position, stacked over the layers of one width, have rank r: the
    # shared W
    for position in positions:
        for width, _ in widths:
            changes = torch.cat(
                [
                    (after - before).double()
                    for side, d, layers in fed
                    if (side, d) == (position, width)
                    for after, before in layers
                ]
            )
            assert torch.linalg.matrix_rank(changes, rtol=1e-5) == ARC_RANK, (position, width)


@pytest.mark.parametrize("family", list(ARC_FAMILIES))
def test_an_adamw_step_moves_only_the_arc_tensors_and_the_head(family):
    _, model, images = _arc_on(family)
    model.train()
    arc.mark_trainable(model, _head(family))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(images).logsumexp(-1).sum().backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == set(arc.arc_state_dict(model, _head(family)))
    heads_moved = moved - set(arc.arc_state_dict(model, head=None))
    assert bool(heads_moved) == (_head(family) is not None)


@pytest.mark.parametrize("family", list(ARC_FAMILIES))
def test_arc_state_dict_round_trips_into_a_second_model(family):
    plain, model, images = _arc_on(family)
    head = _head(family)
    second = arc.add_adapters(copy.deepcopy(plain), rank=ARC_RANK)
    arc.load_arc_state_dict(second, arc.arc_state_dict(model, head), head)
    with torch.no_grad():
        assert torch.equal(second(images), model(images))
    with pytest.raises(ValueError, match="does not fit this model"):
        arc.load_arc_state_dict(
            arc.add_adapters(copy.deepcopy(plain), rank=ARC_RANK, method="arc_att"),
            arc.arc_state_dict(model, head),
            head,
        )


def test_vit_py_with_arc_and_a_timm_vit_with_add_adapters_give_the_same_logits():
    ours = randomize_arc(
        vit.VisionTransformer(8, 32, 3, 2, 64, num_classes=5, img_size=32, arc="arc", rank=ARC_RANK)
    ).eval()
    timm_like = (
        TimmStyleViT()
    )  # timm's names: vit.py's backbone, then its ARC tensors, load as they are
    timm_like.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if k in timm_like.state_dict()}, strict=True
    )
    arc.load_arc_state_dict(
        arc.add_adapters(timm_like, rank=ARC_RANK).eval(), arc.arc_state_dict(ours)
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(timm_like(images), ours(images))


def test_q_k_and_v_projections_share_one_adapter_output_and_dropout_mask():
    model = arc.add_adapters(HFStyleViT(), rank=ARC_RANK, dropout=0.5).train()
    seen, computed = [], []
    for layer in model.vit.layers:
        layer.adapter_att.register_forward_hook(lambda module, args, out: computed.append(out))
        for projection in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
            projection.register_forward_pre_hook(
                lambda module, args: seen.append(args[0])
            )  # after ARC's own hook
    model(torch.randn(2, 3, 32, 32))
    assert len(computed) == 3 and len(seen) == 9
    assert all(seen[3 * i] is seen[3 * i + 1] is seen[3 * i + 2] is computed[i] for i in range(3))


def test_torchvision_swin_b_and_vit_b_16_get_the_paper_s_parameter_counts():
    model = arc.add_adapters(
        torchvision.models.swin_b(num_classes=47)
    )  # per-stage W: 128, 256, 512, 1024 wide
    assert arc.mark_trainable(model) == 218_464 + 1024 * 47 + 47
    model = arc.add_adapters(torchvision.models.vit_b_16(num_classes=47), method="arc_att")
    assert arc.mark_trainable(model, head="heads") == 84_359


def test_a_copy_of_a_hooked_model_folds_without_touching_the_original():
    _, model, images = _arc_on("transformers ViT")
    with torch.no_grad():
        adapted = model(images)
        arc.reparameterize(copy.deepcopy(model))
        assert torch.equal(model(images), adapted)  # the original keeps its adapters and hooks


def test_a_layer_used_through_its_weight_is_never_silently_left_without_adapters():
    torch.manual_seed(0)
    model = TimmStyleViT().eval()
    for block in model.blocks:
        block.attn.__class__ = FunctionalAttention
    images = torch.randn(2, 3, 32, 32)
    targets = {"att": "blocks.*.attn.qkv", "ffn": "blocks.*.mlp.fc1"}  # qkv, never called
    with pytest.raises(
        RuntimeError, match="never called in TimmStyleBlock's forward.*'module:linear'"
    ):
        arc.add_adapters(copy.deepcopy(model), rank=ARC_RANK, targets=targets)(images)
    # whichever module is called first: here a block, not the model
    hooked = arc.add_adapters(copy.deepcopy(model), rank=ARC_RANK, targets=targets)
    with pytest.raises(RuntimeError, match="adapter for attn.qkv was never called"):
        hooked.blocks[1](torch.randn(2, 17, 32))
    # timm's own names hook the attention module, which applies qkv: recognised as it is
    recognised = randomize_arc(arc.add_adapters(copy.deepcopy(model), rank=ARC_RANK))
    with torch.no_grad():
        expected = recognised(images)
        assert (arc.reparameterize(recognised)(images) - expected).abs().max() < 1e-5
    # named as "the module that receives the tokens : the layer it applies to them", it works and
    # folds
    adapted = randomize_arc(
        arc.add_adapters(
            model, rank=ARC_RANK, targets={"att": "blocks.*.attn:qkv", "ffn": "blocks.*.mlp.fc1"}
        )
    )
    with torch.no_grad():
        expected = adapted(images)
        assert (arc.reparameterize(adapted)(images) - expected).abs().max() < 1e-5
    no_bias = TimmStyleViT()  # qkv without a bias, and no q and v biases elsewhere
    for block in no_bias.blocks:
        block.attn.qkv = torch.nn.Linear(32, 96, bias=False)
    names = [name for name, _ in no_bias.named_modules()]
    with pytest.raises(ValueError, match="blocks.0.attn.qkv has no bias, so ARC's b_l could only"):
        arc.add_adapters(no_bias)
    # refused whole: nothing added before the error
    assert [name for name, _ in no_bias.named_modules()] == names


def test_an_unrecognised_model_or_wrong_targets_get_one_clear_error():
    with pytest.raises(
        ValueError,
        match=r"does not recognise Sequential \(see arc.FAMILIES\): name the layers that its "
        r"normed tokens feed.*targets=\{'att': \.\.\..*after a norm: none$",
    ):
        arc.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(
        ValueError,
        match=r"targets\['att'\] = 'blocks.\*.attention' names no module of TimmStyleViT",
    ):
        arc.add_adapters(
            TimmStyleViT(), targets={"att": "blocks.*.attention", "ffn": "blocks.*.mlp.fc1"}
        )
    model = TimmStyleViT()
    with pytest.raises(
        ValueError,
        match="blocks.0.norm2 is a LayerNorm: ARC adapters feed, and fold into, nn.Linear",
    ):
        arc.add_adapters(model, targets={"att": "blocks.*.attn.qkv", "ffn": "blocks.*.norm2"})
    assert (
        not any(arc.is_arc(m) for m in model.modules())
        and not model.blocks[0].attn.qkv._forward_pre_hooks
    )
    with pytest.raises(
        ValueError,
        match="blocks.0.adapter_att is a slot whose output feeds attn.qkv, not attn.proj",
    ):
        arc.add_adapters(
            tiny_vit(num_classes=5),
            targets={"att": "blocks.*.attn.proj", "ffn": "blocks.*.mlp.fc1"},
        )
    model = randomize_arc(swin_tiny(arc="arc")).eval()  # torch.fx traces its adapters
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(images), model(images))
    with pytest.raises(ValueError, match="method must be one of"):
        arc.add_adapters(TimmStyleViT(), method="lora")
    with pytest.raises(ValueError, match="exists already"):
        arc.add_adapters(arc.add_adapters(TimmStyleViT()))
    backbone = arc.add_adapters(
        HFStyleViT().vit, rank=ARC_RANK
    )  # transformers' ViTModel: no classifier
    with pytest.raises(
        ValueError,
        match=r"Module has no classifier head \(an nn.Linear named head, .*\): pass head=",
    ):
        arc.mark_trainable(backbone)
    assert arc.mark_trainable(backbone, head=None) == 2 * (32 * ARC_RANK + 3 * (ARC_RANK + 32))


def test_beit_folds_exactly_into_its_q_and_v_biases_and_drops_the_keys_share():
    # a vector added to every key adds q . c to all of one query's logits: softmax ignores it
    _, model, images = _arc_on("timm BEiT (q and v biases of its own)")
    attention = model.blocks[0].attn
    q_bias, v_bias = attention.q_bias.clone(), attention.v_bias.clone()
    shift = attention.qkv.weight.detach() @ model.blocks[0].adapter_att.bias.detach()  # Wt b_l
    with torch.no_grad():
        adapted = model(images)
        folded = arc.reparameterize(model)
        assert (folded(images) - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    assert torch.allclose(attention.q_bias, q_bias + shift[:32], atol=1e-6)
    assert torch.allclose(attention.v_bias, v_bias + shift[64:], atol=1e-6)
    assert shift[32:64].abs().max() > 0.1 and torch.equal(attention.k_bias, torch.zeros(32))


def test_eva02_whose_keys_rotate_by_position_is_refused_with_the_reason():
    model = _timm_beit(rotary=True)
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(
        ValueError, match=r"blocks.0.attn.qkv has no bias for the keys.*rotary embeddings.*EVA-02"
    ):
        arc.add_adapters(model)
    assert [name for name, _ in model.named_modules()] == names  # nothing added
    hf_like = LayoutModel(_stack("layers", HF_VIT, key_bias=False))
    hf_like.rotary_emb = RotaryEmbeddingCat()
    with pytest.raises(ValueError, match=r"layers.0.attention.k_proj has no bias for the keys"):
        arc.add_adapters(hf_like)


def test_torch_fx_traces_an_adapted_torchvision_swin():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = randomize_arc(arc.add_adapters(torchvision.models.swin_t(num_classes=5))).eval()
    images = torch.randn(1, 3, 224, 224)
    extractor = create_feature_extractor(model, return_nodes={"head": "logits"})
    with torch.no_grad():  # the traced graph has both adapters: the FFN one by its hook on mlp
        assert torch.equal(extractor(images)["logits"], model(images))


def test_every_classifier_head_trains_and_nothing_else_is_taken_for_one():
    distilled = arc.add_adapters(DistilledViT(), rank=ARC_RANK)
    heads = {k for k in arc.arc_state_dict(distilled) if k.startswith("head")}
    assert heads == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    siglip = arc.add_adapters(
        LayoutModel(_stack("encoder.layers", HF_CLIP), heads=(), pool="head"), rank=ARC_RANK
    )
    assert isinstance(siglip.head, AttentionPool)  # named head, but the backbone's pooling
    with pytest.raises(ValueError, match="LayoutModel has no classifier head.*head=None to train"):
        arc.mark_trainable(siglip)
    assert arc.mark_trainable(siglip, head=None) == 2 * (32 * ARC_RANK + 3 * (ARC_RANK + 32))
    torchvision_vit = torchvision.models.VisionTransformer(
        32, 8, 3, 2, 32, 64, representation_size=16
    )
    assert [k for k in arc.arc_state_dict(torchvision_vit)] == [
        "heads.head.weight",
        "heads.head.bias",
    ]
    assert arc.mark_trainable(TimmStyleSwin(), head="head.fc") == 64 * 5 + 5


def test_targets_naming_nothing_or_an_unknown_position_are_errors():
    model = HFStyleViT()
    misspelt = ["attention.q_proj", "attention.k_proj", "attention.v_prj"]
    with pytest.raises(ValueError, match=r"targets\['att'\] = 'attention.v_prj' names no module"):
        arc.add_adapters(model, targets={"att": misspelt, "ffn": "mlp.fc1"})
    with pytest.raises(ValueError, match=r"targets\['att'\] = 'attention.q_prj' names no module"):
        arc.add_adapters(model, targets={"att": "attention.{q,k,v}_prj", "ffn": "mlp.fc1"})
    with pytest.raises(ValueError, match=r"adapts the positions \['att', 'ffn'\]: targets has"):
        arc.add_adapters(model, targets={"att": "attention.q_proj", "mlp": "mlp.fc1"})
    with pytest.raises(ValueError, match=r"'arc_att' adapts the positions \['att'\]"):
        arc.add_adapters(
            model, method="arc_att", targets={"att": "attention.q_proj", "ffn": "mlp.fc1"}
        )
    assert not any(arc.is_arc(m) for m in model.modules())


def test_an_unrecognised_model_is_shown_its_own_linear_layers_after_norms():
    model = LayoutModel(
        _stack(
            "trunk",
            {
                "norm1": "pre",
                "q": "mix.a",
                "k": "mix.b",
                "v": "mix.c",
                "proj": "out",
                "norm2": "post",
                "fc1": "ff.up",
                "fc2": "ff.down",
            },
        )
    )
    with pytest.raises(
        ValueError,
        match=r"Its first linear layers after a norm: trunk.\*.mix.a, "
        r"trunk.\*.ff.up, classifier$",
    ):
        arc.add_adapters(model)
    adapted = arc.add_adapters(
        model, targets={"att": "trunk.*.mix.{a,b,c}", "ffn": "trunk.*.ff.up"}
    )
    assert arc.mark_trainable(adapted) == 2 * (32 * 50 + 3 * (50 + 32)) + 32 * 5 + 5


def test_add_adapters_makes_its_tensors_like_the_model_s_and_leaves_the_backbone_s_modes_alone():
    model = TimmStyleViT().to(torch.float64).eval()
    model.blocks[0].mlp.drop1.train()  # a mode the user set on one backbone module
    arc.add_adapters(model, rank=ARC_RANK)
    assert {p.dtype for name, p in model.named_parameters()} == {torch.float64}
    assert (
        model.blocks[0].mlp.drop1.training and not model.blocks[0].adapter_att.training
    )  # the model's mode: eval
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_torchvision_swins_that_could_not_fold_exactly_are_refused():
    from torchvision.models import swin_transformer as tv

    v2 = tv.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=[4, 4],
        block=tv.SwinTransformerBlockV2,
        downsample_layer=tv.PatchMergingV2,
    )
    with pytest.raises(
        ValueError, match="features.1.0.attn.qkv: its attention is cosine attention.*Swin V2"
    ):
        arc.add_adapters(v2)
    v1 = arc.add_adapters(_torchvision_swin(), rank=ARC_RANK).eval()
    assert v1(torch.randn(1, 3, 32, 32)).shape == (
        1,
        5,
    )  # 8x8 and 4x4 maps: the 4x4 windows divide them
    with pytest.raises(
        ValueError,
        match="a 10x10 map does not split into 4x4 windows: torchvision's Swin would pad",
    ):
        v1(
            torch.randn(1, 3, 40, 40)
        )  # padded after the adapter: its bias would reach the padding once folded


# --------------------------------------------------------------------------------------------------
# The models and their weight loaders (vit.py, swin.py): Google's, timm's and Microsoft's layouts,
# Swin's semantics


def assert_loaded_like_google(model, arrays):
    """Each loaded tensor computes what the .npz array computes in Google's (in, out) convention."""

    def t(name):
        return torch.from_numpy(arrays[name])

    block, att = (
        model.blocks[-1],
        f"Transformer/encoderblock_{len(model.blocks) - 1}/MultiHeadDotProductAttention_1/",
    )
    with torch.no_grad():
        patch = torch.randn(1, 3, *model.patch_embed.proj.kernel_size)
        expected = torch.einsum("chw,hwco->o", patch[0], t("embedding/kernel")) + t(
            "embedding/bias"
        )
        assert torch.allclose(model.patch_embed.proj(patch).flatten(), expected, atol=1e-5)
        x = torch.randn(t("cls").shape[-1])
        qkv = block.attn.qkv(x).chunk(3)
        for out, name in zip(qkv, ("query", "key", "value"), strict=True):
            expected = torch.einsum("d,dhk->hk", x, t(f"{att}{name}/kernel")) + t(
                f"{att}{name}/bias"
            )
            assert torch.allclose(out, expected.flatten(), atol=1e-5)
        heads = t(f"{att}out/kernel").shape[0]
        expected = torch.einsum("hk,hkd->d", x.view(heads, -1), t(f"{att}out/kernel")) + t(
            f"{att}out/bias"
        )
        assert torch.allclose(block.attn.proj(x), expected, atol=1e-5)
        mlp = f"Transformer/encoderblock_{len(model.blocks) - 1}/MlpBlock_3/"
        assert torch.allclose(
            block.mlp.fc1(x), x @ t(mlp + "Dense_0/kernel") + t(mlp + "Dense_0/bias"), atol=1e-5
        )
        assert torch.equal(
            block.norm2.weight,
            t(f"Transformer/encoderblock_{len(model.blocks) - 1}/LayerNorm_2/scale"),
        )
        assert torch.equal(model.cls_token, t("cls"))
        assert torch.equal(model.norm.bias, t("Transformer/encoder_norm/bias"))


def reference_images(n, size):
    """Deterministic, free of any random number generator: the inputs of the golden-logit tests."""
    return (
        torch.sin(torch.arange(n * 3 * size * size, dtype=torch.float64) * 0.37)
        .view(n, 3, size, size)
        .float()
    )


# Logits of timm 1.0.31's VisionTransformer on the same tiny .npz (loaded by timm's own npz loader)
# and the same inputs, computed once outside this repo: an independent implementation, without
# depending on it.
TIMM_VIT_LOGITS = [
    [-0.32729971, 0.47661120, 0.04489766, -0.92059106, -0.45604095],
    [-0.32190135, 0.50408822, 0.11661853, -1.03994310, -0.51454759],
]


def swin_reference_weights():
    """Deterministic random weights, Microsoft's layout, for swin_tiny(): numpy's seeded generator
    over the sorted parameter names, so the same tensors can be fed to timm in a script outside this
    repo."""
    rng = np.random.default_rng(0)
    sd = {}
    for name, tensor in sorted(swin_tiny().state_dict().items()):
        values = rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
        scale = (
            0.5
            if "relative_position_bias_table" in name
            else 0.1
            if name.endswith("norm.weight") or re.search(r"norm\d\.weight$", name)
            else 0.2
        )
        sd[name] = torch.from_numpy(
            values * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        )
    return sd


# timm 1.0.31's SwinTransformer (img 64, patch 4, window 4, embed 16, depths (2, 2, 2), heads (1, 2,
# 4)) on swin_reference_weights() renamed to timm's layout, and the same inputs: computed once
# outside this repo.
TIMM_SWIN_LOGITS = [
    [0.70471120, 3.41673279, 0.15904297, 0.68525320, -0.99523121],
    [0.89522320, 2.79173684, 0.50579470, 0.64907320, -1.11739779],
]


def swin_reference_arc_tensors(rank=4):
    """Deterministic ARC tensors for swin_tiny(arc="arc", rank=rank), from numpy's seeded generator
    as above."""
    rng = np.random.default_rng(1)
    model = swin_tiny(arc="arc", rank=rank, ffn_adapter="residual")
    return {
        name: torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32) * 0.3)
        for name, t in sorted(model.state_dict().items())
        if "adapter" in name or "down_proj" in name
    }


# The official ARC Swin (Model/ARC_swin_b.py at 8227d57, run with torch 2.11 and timm 1.0.31 outside
# this repo) at swin_tiny's size and rank 4, on swin_reference_weights() and
# swin_reference_arc_tensors() under its names (layers.{s}.attn_u, mlp_u; blocks.{j}.attn_lambda,
# attn_lambda_bias, mlp_lambda, mlp_lambda_bias), in eval mode.
OFFICIAL_ARC_SWIN_LOGITS = [
    [1.63588762, 0.10339437, 1.52439380, -0.59871161, -0.57261765],
    [1.99664140, 0.53178465, 1.74008203, -0.74502832, -0.25428307],
]


def timm_swin_layout(sd):
    """Microsoft's names -> timm >= 0.9's: downsample at the start of the next stage, head.fc."""
    out = {}
    for k, v in sd.items():
        k = re.sub(
            r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", k
        )
        out[re.sub(r"^head\.", "head.fc.", k)] = v
    return out


def test_auto_weights_for_every_vit_size():
    assert set(vit.URLS) == {"vit_t16", "vit_s16", "vit_b16", "vit_l16", "vit_h14"}
    assert (
        "/augreg/Ti_16-i21k-300ep-" in vit.URLS["vit_t16"]
        and "/augreg/S_16-i21k-300ep-" in vit.URLS["vit_s16"]
    )


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="arc must be"):
        tiny_vit(arc="lora")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.vit_b16(img_size=200)
    with pytest.raises(ValueError, match="dropout must be"):
        tiny_vit(dropout=1.0)


def test_vit_dropout_sits_after_the_position_embedding_and_in_the_mlp_only():
    # the official "vit_drop": after pos_embed is added, after the MLP's GELU, after its fc2; none
    # in attention
    model = tiny_vit(num_classes=5, dropout=0.5).train()  # no ARC, so no adapter dropout either
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 1 + 2 * len(
        model.blocks
    )
    assert (
        vit.vit_t16(dropout=0.25).blocks[11].mlp.drop2.p == 0.25
    )  # the size constructors pass it on
    block, seen = model.blocks[0], {}
    block.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0]))
    block.attn.register_forward_hook(lambda module, args, out: seen.update(attention=out))
    block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.update(fc1=out))
    block.mlp.fc2.register_forward_pre_hook(lambda module, args: seen.update(hidden=args[0]))
    block.mlp.register_forward_hook(lambda module, args, out: seen.update(mlp=out))
    torch.manual_seed(0)
    model(torch.randn(4, 3, 32, 32))
    # dropout leaves exact zeros in about half of the values; these activations have none of their
    # own
    zeros = {
        name: (seen[name] == 0).float().mean().item()
        for name in ("tokens", "attention", "hidden", "mlp")
    }
    assert zeros["attention"] == 0 and all(
        0.4 < zeros[n] < 0.6 for n in ("tokens", "hidden", "mlp")
    ), zeros
    kept = seen["hidden"] != 0  # and the kept values are GELU's, doubled: the dropout acts after it
    assert torch.allclose(seen["hidden"][kept], 2 * torch.nn.functional.gelu(seen["fc1"][kept]))
    tokens = torch.randn(2, 17, 32)
    assert torch.equal(block.attn(tokens), block.attn(tokens))  # nor on the attention probabilities


@pytest.mark.parametrize(
    "build, rate, size",
    [
        (
            lambda **kw: randomize_arc(
                tiny_vit(num_classes=5, arc="arc", adapter_dropout=0.0, **kw)
            ),
            "dropout",
            32,
        ),
        (lambda **kw: randomize_swin(swin_tiny(**kw)), "drop_path", 64),
    ],
)
def test_vit_dropout_and_swin_drop_path_act_in_training_and_are_the_identity_in_eval(
    build, rate, size
):
    model, without = build(**{rate: 0.3}), build()  # `without`: rate 0, given the same weights
    without.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), without.eval()(images))
        torch.manual_seed(0)
        assert (model.train()(images) - without.train()(images)).abs().max() > 1e-3


def test_vit_logits_match_timm_on_the_same_google_npz(tmp_path):
    write_google_npz(tmp_path / "tiny.npz", 32, 2, 2, 64, 8, 5, 4)
    model = vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "tiny.npz").eval()
    with torch.no_grad():
        logits = model(reference_images(2, 32))
    assert torch.allclose(logits, torch.tensor(TIMM_VIT_LOGITS), atol=1e-5, rtol=0)
    assert all(
        m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
    )  # Google's eps


def test_full_size_google_npz_loads_into_vit_b16(vit_b16_npz):
    path, arrays = vit_b16_npz
    with pytest.warns(UserWarning, match="head not loaded"):
        model = vit.load_pretrained(vit.vit_b16(num_classes=47, arc="arc"), path)
    assert_loaded_like_google(model, arrays)
    assert torch.all(model.head.weight == 0)
    model = vit.load_pretrained(vit.vit_b16(num_classes=21843), path)
    assert torch.equal(model.head.weight, torch.from_numpy(arrays["head/kernel"]).T)


@pytest.mark.parametrize("prefix", ["", "opt/target/", "params/"])
def test_google_npz_with_prefix_loads(tmp_path, prefix):
    arrays = write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4, prefix=prefix)
    model = vit.load_pretrained(tiny_vit(num_classes=5, arc="arc"), tmp_path / "w.npz")
    assert_loaded_like_google(model, arrays)
    assert torch.equal(
        model.pos_embed, torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
    )


def test_timm_layout_state_dict_round_trips(tmp_path):
    source = randomize_arc(tiny_vit(num_classes=5))  # a plain ViT with random weights everywhere
    torch.save({"model": source.state_dict()}, tmp_path / "timm.pth")
    model = vit.load_pretrained(tiny_vit(num_classes=5, arc="arc"), tmp_path / "timm.pth")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_position_embeddings_are_resized_for_another_image_size(tmp_path):
    arrays = write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4)
    pos = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
    with pytest.warns(UserWarning, match="resized from 16 to 64 patches"):
        model = vit.load_pretrained(
            vit.VisionTransformer(8, 32, 2, 2, 64, num_classes=5, img_size=64), tmp_path / "w.npz"
        )
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(model.pos_embed[:, 0], pos[:, 0])  # the class token's embedding is kept
    grid = model.pos_embed[0, 1:].view(8, 8, 32)
    assert torch.allclose(
        grid[::2, ::2].mean(), pos[0, 1:].mean(), atol=0.05
    )  # an interpolation, not noise


def test_arc_py_and_vit_py_copied_alone_build_load_train_fold_and_reload(tmp_path):
    for name in ("arc.py", "vit.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    hub = (
        tmp_path / "torch_home" / "hub" / "checkpoints"
    )  # where "auto" finds Google's file, as if downloaded
    hub.mkdir(parents=True)
    write_google_npz(hub / os.path.basename(vit.URLS["vit_t16"]), 192, 12, 3, 768, 16, 5, 2)
    script = """import torch, arc, vit
model = vit.load_pretrained(vit.vit_t16(num_classes=5, img_size=32, arc="arc"), "auto")
arc.mark_trainable(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
images = torch.randn(4, 3, 32, 32)
torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])).backward()
optimizer.step()
with torch.no_grad():
    adapted = model.eval()(images)
    plain = vit.vit_t16(num_classes=5, img_size=32).eval()
    plain.load_state_dict(arc.reparameterize(model).state_dict(), strict=True)
    print((plain(images) - adapted).abs().max().item(), model.blocks[1].adapter_ffn)
"""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": "", "TORCH_HOME": str(tmp_path / "torch_home")},
    )
    assert result.returncode == 0, result.stderr[
        -2000:
    ]  # nothing of this repository on its path but the two files
    gap, folded_slot = result.stdout.split(maxsplit=1)
    assert float(gap) < 1e-4 and folded_slot.startswith("Identity()")
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".py")) == [
        "arc.py",
        "vit.py",
    ]


def test_bad_weight_files_fail_with_a_clear_error(tmp_path):
    write_google_npz(tmp_path / "large.npz", 48, 2, 2, 64, 8, 5, 4)  # wider: another model size
    with pytest.raises(
        vit.CheckpointError,
        match=r"large\.npz does not fit.*patch_embed\.proj\.weight \(48, 3, 8, 8\) vs "
        r"\(32, 3, 8, 8\)",
    ):
        vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "large.npz")
    torch.save({"layers.0.blocks.0.attn.qkv.weight": torch.zeros(3)}, tmp_path / "swin.pth")
    with pytest.raises(vit.CheckpointError, match=r"swin\.pth does not fit.*missing \['cls_token'"):
        vit.load_pretrained(tiny_vit(num_classes=5), tmp_path / "swin.pth")
    with pytest.raises(vit.CheckpointError, match="no such file"):
        vit.load_pretrained(tiny_vit(), tmp_path / "absent.npz")
    write_google_npz(tmp_path / "w.npz", 32, 2, 2, 64, 8, 5, 4)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:5000])
    with pytest.raises(vit.CheckpointError, match=r"cut\.npz: unreadable"):
        vit.load_pretrained(tiny_vit(), tmp_path / "cut.npz")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(vit.CheckpointError, match=r"text\.pth: unreadable"):
        vit.load_pretrained(tiny_vit(), tmp_path / "text.pth")


def test_swin_t_windows_and_buffers():
    model = swin.swin_t()
    assert [s.blocks[1].shift for s in model.layers] == [
        3,
        3,
        3,
        0,
    ]  # 7x7 map in the last stage: no shift
    assert model.layers[3].blocks[0].attn.relative_position_bias_table.shape == (169, 24)
    assert not [k for k in model.state_dict() if "relative_position_index" in k or "attn_mask" in k]
    assert model.layers[0].downsample.reduction.weight.shape == (192, 384)
    assert isinstance(model.layers[3].downsample, torch.nn.Identity)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"arc": "lora"}, "arc must be"),
        ({"img_size": 200}, "multiple of 32"),
        ({"img_size": 256}, "windows"),  # 64x64 first map does not split into 7x7 windows
        ({"drop_path": 1.0}, "drop_path must be"),
    ],
)
def test_swin_rejects_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        swin.swin_t(**kw)


def test_swin_head_starts_normal_with_std_0_02_and_zero_bias():
    # the official ARC Swin's head: timm's trunc_normal_(std=.02), whose +-2 bounds are 100 std away
    torch.manual_seed(0)
    head = swin_tiny(num_classes=1000).head
    assert 0.0195 < head.weight.std() < 0.0205 and 0.07 < head.weight.abs().max() < 0.2
    assert abs(head.weight.mean()) < 0.001 and torch.all(head.bias == 0)


def test_swin_relative_position_index():
    w = 3
    index = swin.relative_position_index(w)
    for a in range(w * w):
        for b in range(w * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            assert index[a, b] == (ya - yb + w - 1) * (2 * w - 1) + (xa - xb + w - 1)


def test_swin_shift_mask_separates_regions():
    resolution, window, shift = 8, 4, 2
    mask = swin.shift_mask(resolution, window, shift)
    assert mask.shape == (4, 16, 16)

    # independently: in the rolled map, token (i, j) of window (wy, wx) came from across the border
    # along an axis when its rolled coordinate is in the last `shift` rows/columns
    def wrapped(w, y, x):
        wy, wx = divmod(w, 2)
        return (wy * 4 + y >= resolution - shift, wx * 4 + x >= resolution - shift)

    for w in range(4):
        for a in range(16):
            for b in range(16):
                assert mask[w, a, b] == (
                    0.0 if wrapped(w, *divmod(a, 4)) == wrapped(w, *divmod(b, 4)) else -100.0
                )
    assert (
        (mask.diagonal(dim1=1, dim2=2) == 0).all()
        and (mask[0] == 0).all()
        and (mask[3] == -100).any()
    )


def test_swin_shift_mask_broadcasts_over_images_instead_of_being_copied(monkeypatch):
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        masks.append((q.shape, attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(swin.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        swin_tiny().eval()(torch.randn(3, 3, 64, 64))
    # stage 0: 16 windows of 4x4 tokens, 1 head, 3 images. A plain block attends as (images x
    # windows, heads) with its bias for all; a shifted one as (images, windows x heads) with one
    # shift mask broadcast over the images, not repeated per image
    assert all(mask[0] == 1 and q[1] == mask[1] for q, mask in masks)
    assert [(tuple(q[:2]), tuple(mask)) for q, mask in masks[:2]] == [
        ((48, 1), (1, 1, 16, 16)),
        ((3, 16), (1, 16, 16, 16)),
    ]


@pytest.mark.parametrize(
    "shift, token, reached",
    [
        (0, (0, 0), {(y, x) for y in range(4) for x in range(4)}),  # its own 4x4 window
        (
            2,
            (3, 3),
            {(y, x) for y in range(2, 6) for x in range(2, 6)},
        ),  # the window shifted by (2, 2)
        (
            2,
            (0, 0),
            {(y, x) for y in range(2) for x in range(2)},
        ),  # wrapped around: the mask isolates it
    ],
)
def test_swin_block_attends_within_its_window(shift, token, reached):
    torch.manual_seed(0)
    block = swin.Block(8, 2, resolution=8, window=4, shift=shift).eval()
    x = torch.randn(1, 64, 8)
    nudged = x.clone()
    nudged[0, token[0] * 8 + token[1]] += torch.randn(8)  # not a constant: LayerNorm would erase it
    with torch.no_grad():
        changed = (block(nudged) - block(x)).abs().amax(-1)[0] > 1e-6
    assert {divmod(i, 8) for i in changed.nonzero().flatten().tolist()} == reached


def test_swin_images_in_a_batch_are_independent():
    # the per-window mask must line up with each image's windows, not leak across images
    model = randomize_swin(swin_tiny()).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), torch.cat([model(image[None]) for image in x]), atol=1e-5)


def test_swin_patch_merging_order():
    # Microsoft's order, which the pretrained reduction weights expect: (0,0), (1,0), (0,1), (1,1)
    # as (row, col)
    merging, seen = swin.PatchMerging(1, resolution=4), []
    merging.norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    merging(torch.arange(16.0).view(1, 16, 1))  # token value = row * 4 + col
    assert seen[0][0].tolist() == [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]]


def test_swin_drop_path_rates_rise_linearly_over_all_blocks():
    rates = [
        block.drop_path.p for stage in swin_tiny(drop_path=0.5).layers for block in stage.blocks
    ]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-6)  # 3 stages of 2 blocks
    rates = [
        block.drop_path.p for stage in swin.swin_b(drop_path=0.1).layers for block in stage.blocks
    ]
    assert len(rates) == 24 and rates[0] == 0 and rates[-1] == pytest.approx(0.1)
    assert rates[4] == pytest.approx(
        0.4 / 23
    )  # the first block of stage 2: the rates run on across stages


def test_swin_drop_path_drops_whole_samples_and_rescales_the_others():
    drop = swin_tiny(drop_path=0.25).layers[2].blocks[1].drop_path.train()  # the last: 0.25
    x = torch.rand(4000, 3, 5) + 1  # no zeros of its own
    torch.manual_seed(0)
    y = drop(x)
    kept, dropped = (y != 0).flatten(1).all(1), (y == 0).flatten(1).all(1)
    assert (kept | dropped).all() and 0.72 < kept.float().mean() < 0.78
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert drop.eval()(x) is x


def test_swin_drop_path_acts_on_both_residual_branches():
    torch.manual_seed(0)
    block = swin.Block(8, 2, resolution=8, window=4, shift=2, drop_path=0.5).train()
    x = torch.randn(64, 64, 8)
    with torch.no_grad():
        unchanged = (block(x) == x).flatten(1).all(1)
    assert (
        0 < unchanged.sum() < 64
    )  # samples whose two branches were both dropped pass through as they are


@pytest.mark.parametrize("placement", ["norm2", "residual"])
def test_swin_ffn_adapter_on_the_residual_stream_is_the_official_placement_and_does_not_fold(
    placement,
):
    # with the MLP's output zeroed, a block's FFN branch adds nothing: whatever the FFN-side adapter
    # still changes, it changes on the skip path. The official ARC Swin's adapter (residual) adds
    # its b_l to every token there; the foldable one (norm2) only feeds the MLP, so it changes
    # nothing
    model = swin_tiny(arc="arc", rank=4, ffn_adapter=placement).eval()
    assert arc.mark_trainable(model) == arc.mark_trainable(
        swin_tiny(arc="arc", rank=4)
    )  # the same tensors
    block = model.layers[0].blocks[1]
    with torch.no_grad():
        block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_(), block.adapter_ffn.scale.zero_()
        x = torch.randn(2, 256, 16)
        before = block(x)
        block.adapter_ffn.bias.copy_(torch.arange(16.0))
        change = block(x) - before
    assert torch.allclose(
        change, torch.arange(16.0).expand_as(change) * (placement == "residual"), atol=1e-5
    )
    if placement == "residual":
        with pytest.raises(
            ValueError, match="adapter_ffn .* transforms the input of a norm.*residual stream"
        ):
            arc.reparameterize(model)
    with pytest.raises(ValueError, match="ffn_adapter must be 'norm2'"):
        swin_tiny(ffn_adapter="fc1")


def test_swin_logits_match_timm_on_the_same_weights(tmp_path):
    torch.save({"model": swin_reference_weights()}, tmp_path / "swin.pth")  # Microsoft's layout
    model = swin.load_pretrained(swin_tiny(), tmp_path / "swin.pth").eval()
    with torch.no_grad():
        logits = model(reference_images(2, 64))
    assert torch.allclose(logits, torch.tensor(TIMM_SWIN_LOGITS), atol=1e-5, rtol=0)


def test_a_plain_swin_cannot_take_the_residual_placement():
    # add_adapters on it later would feed the slot's adapter to fc1, though the block applies it to
    # the residual stream
    with pytest.raises(
        ValueError,
        match="ffn_adapter='residual' places ARC's FFN adapter: build the model with arc=",
    ):
        swin_tiny(ffn_adapter="residual")


def test_swin_with_the_residual_ffn_adapter_gives_the_official_arc_swin_logits():
    model = swin_tiny(arc="arc", rank=4, ffn_adapter="residual").eval()
    model.load_state_dict({**swin_reference_weights(), **swin_reference_arc_tensors()}, strict=True)
    with torch.no_grad():
        assert torch.allclose(
            model(reference_images(2, 64)),
            torch.tensor(OFFICIAL_ARC_SWIN_LOGITS),
            atol=1e-5,
            rtol=0,
        )
        foldable = swin_tiny(
            arc="arc", rank=4
        ).eval()  # the same tensors, the FFN adapter after norm2: another model
        foldable.load_state_dict(model.state_dict(), strict=True)
        assert (
            foldable(reference_images(2, 64)) - torch.tensor(OFFICIAL_ARC_SWIN_LOGITS)
        ).abs().max() > 0.1


def test_swin_auto_weights_are_what_the_official_arc_swin_loaded():
    assert set(swin.URLS) == {"swin_t", "swin_s", "swin_b", "swin_l"}
    for url in (
        swin.URLS.values()
    ):  # pre-trained on ImageNet-22k, fine-tuned on 1k: not the 22k-only files
        assert re.search(
            r"/swin_(tiny|small|base|large)_patch4_window7_224_22kto1k(_finetune)?\.pth$", url
        ), url


def test_swin_loads_microsoft_and_timm_layouts(tmp_path):
    sd = randomize_swin(swin_tiny()).state_dict()
    garbage = {
        "layers.0.blocks.0.attn.relative_position_index": torch.randint(0, 49, (16, 16)),
        "layers.0.blocks.1.attn_mask": torch.randn(16, 16, 16),
    }
    torch.save({"model": {**sd, **garbage}}, tmp_path / "microsoft.pth")
    torch.save(timm_swin_layout(sd), tmp_path / "timm.pth")
    assert "layers.1.downsample.reduction.weight" in timm_swin_layout(sd)
    x, logits = torch.randn(2, 3, 64, 64), []
    for name in ("microsoft.pth", "timm.pth"):
        torch.manual_seed(0)  # the same adapters in both
        model = swin.load_pretrained(swin_tiny(arc="arc", rank=4), tmp_path / name).eval()
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in sd.items()), name
        assert (
            model.layers[0].blocks[0].attn.relative_position_index.max() == 48
        )  # rebuilt, not loaded
        with torch.no_grad():
            logits.append(model(x))
    assert torch.equal(*logits)
    # another head (e.g. ImageNet-22k's): backbone loads, head stays as initialised
    torch.manual_seed(0)
    initialised = swin_tiny(num_classes=7).head.weight
    torch.manual_seed(0)
    with pytest.warns(
        UserWarning,
        match=r"head not loaded from .*microsoft\.pth \(file \[\(5, 64\), \(5,\)\], model "
        r"\[\(7, 64\), \(7,\)\]\)",
    ):
        model = swin.load_pretrained(swin_tiny(num_classes=7), tmp_path / "microsoft.pth")
    assert torch.equal(model.head.weight, initialised) and torch.equal(
        model.norm.weight, sd["norm.weight"]
    )


def test_swin_rejects_mismatching_checkpoints(tmp_path):
    torch.save({"model": swin_tiny().state_dict()}, tmp_path / "narrow.pth")
    torch.save(
        vit.VisionTransformer(16, 16, 1, 2, 32, img_size=32).state_dict(), tmp_path / "vit.pth"
    )
    wider = swin.SwinTransformer(24, (2, 2, 2), (1, 2, 4), window=4, img_size=64, num_classes=5)
    for model, name in ((wider, "narrow.pth"), (swin_tiny(), "vit.pth")):
        with pytest.raises(vit.CheckpointError, match=re.escape(str(tmp_path / name))):
            swin.load_pretrained(model, tmp_path / name)
