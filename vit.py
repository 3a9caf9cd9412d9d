"""The Vision Transformer (ViT, Dosovitskiy et al., 2021) that ARC fine-tunes, written from scratch:
patches embedded by a strided convolution, a cls token and position embeddings, pre-norm blocks of
multi-head attention and MLP, and a linear head on the cls token. With ARC (arc.py), each block
calls its two adapters explicitly, x = x + attn(adapter_att(norm1(x))) and x = x +
mlp(adapter_ffn(norm2(x))), the form the paper gives; without ARC they are identities. The file also
reads the published weights. Depends on torch, numpy (for Google's .npz files) and arc.py: copy the
two together.

    model = vit_b16(num_classes=47, arc="arc")  # or arc="arc_att", or arc=None (plain ViT)
    load_pretrained(model, "auto")  # Google's ImageNet-21k weights, downloaded once
    load_pretrained(model, "ViT-B_16.npz")  # or a file: a Google .npz or a timm state dict
    logits = model(images)  # images: (B, 3, 224, 224), normalised

Parameter names follow timm (cls_token, pos_embed, blocks.{i}.attn.qkv, ...), so timm state dicts
load as they are, and a folded model loads into timm's. ARC's tensors are down_proj_att and
down_proj_ffn (each a W, shared by all blocks) and blocks.{i}.adapter_{att,ffn} (c_l, b_l).

`dropout` is the official ARC ViT's "vit_drop": one rate after the position embedding, after the
MLP's GELU and after its fc2; none in attention. It has no parameters, so state dicts do not change.
Notes on loading (a head left out, position embeddings resized) are warnings: the caller shows them.
"""

import os
import tempfile
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from arc import METHODS, ARCAdapter, SharedProjection, arc_state_dict, state_dict_mismatch

CONFIGS = {  # name -> patch size, width, depth, heads, MLP width
    "vit_t16": (16, 192, 12, 3, 768),
    "vit_s16": (16, 384, 12, 6, 1536),
    "vit_b16": (16, 768, 12, 12, 3072),
    "vit_l16": (16, 1024, 24, 16, 4096),
    "vit_h14": (14, 1280, 32, 16, 5120),
}
# ImageNet-21k checkpoints: the original ones ARC starts from (B, L, H), and for Ti and S the AugReg
# ones timm's pretrained configs name (vit_tiny_patch16_224.augreg_in21k,
# vit_small_patch16_224.augreg_in21k)
URLS = {
    "vit_t16": "https://storage.googleapis.com/vit_models/augreg/"
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_s16": "https://storage.googleapis.com/vit_models/augreg/"
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_b16": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
    "vit_l16": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-L_16.npz",
    "vit_h14": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-H_14.npz",
}
# Google's AugReg ImageNet-21k ViT-B/16 (timm's vit_base_patch16_224.augreg_in21k): the weights of
# the paper's ARC* rows (--weights augreg). How ARC* was trained was never published.
AUGREG_URLS = {
    "vit_b16": "https://storage.googleapis.com/vit_models/augreg/"
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
}


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v in one matmul; ARC folds into it as one
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.drop1 = nn.Dropout(dropout)  # after the GELU
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """x = x + MHA(A_att(LN1(x))); x = x + FFN(A_ffn(LN2(x))). The adapters are identities until
    the model puts ARC's there (VisionTransformer)."""

    # tells arc.reparameterize which layer each adapter's output enters, to fold it there
    adapter_feeds = {"adapter_att": ["attn.qkv"], "adapter_ffn": ["mlp.fc1"]}

    def __init__(self, dim, heads, mlp_dim, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.adapter_att = nn.Identity()
        self.adapter_ffn = nn.Identity()

    def forward(self, x):
        x = x + self.attn(self.adapter_att(self.norm1(x)))
        return x + self.mlp(self.adapter_ffn(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        patch_size,
        dim,
        depth,
        heads,
        mlp_dim,
        num_classes=1000,
        img_size=224,
        arc=None,
        rank=50,
        adapter_dropout=0.1,
        dropout=0.0,
    ):
        super().__init__()
        if arc not in (None, *METHODS):
            raise ValueError(f"arc must be None or one of {list(METHODS)}, not {arc!r}")
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} is not a multiple of the patch size {patch_size}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        self.config = (patch_size, dim, depth, heads, mlp_dim)
        # an empty module holding .proj, so that the weights are named patch_embed.proj as in timm
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch_size) ** 2, dim) * 0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        # as the official recipe: the new task starts from zero logits
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # ARC: per position one W, shared by every block's adapter
        if arc:
            self.down_proj_att = SharedProjection(dim, rank)
            for block in self.blocks:
                block.adapter_att = ARCAdapter(self.down_proj_att, "att", adapter_dropout)
        if arc == "arc":
            self.down_proj_ffn = SharedProjection(dim, rank)
            for block in self.blocks:
                block.adapter_ffn = ARCAdapter(self.down_proj_ffn, "ffn", adapter_dropout)

    def forward(self, images):  # images: (B, 3, H, W)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, N, dim), N patches
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + N, dim)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


vit_t16 = partial(VisionTransformer, *CONFIGS["vit_t16"])
vit_s16 = partial(VisionTransformer, *CONFIGS["vit_s16"])
vit_b16 = partial(VisionTransformer, *CONFIGS["vit_b16"])
vit_l16 = partial(VisionTransformer, *CONFIGS["vit_l16"])
vit_h14 = partial(VisionTransformer, *CONFIGS["vit_h14"])


# --------------------------------------------------------------------------------------------------
# Weights files: the published checkpoints, downloaded once; Google's .npz and torch state dicts,
# read with errors that say what the file is; loaded strictly, but for the head. swin.py uses these
# too.


class CheckpointError(ValueError):
    """A weights file that cannot be downloaded, is unreadable, or fits another architecture."""


def cached_file(url):
    """Where torch hub's cache keeps the download of `url` (~/.cache/torch/hub/checkpoints; see
    TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def download(url, progress=False):
    """The path of `url`'s file in torch hub's cache, downloaded there the first time (torch writes
    a temporary file and renames it, so an interrupted download leaves nothing behind). `progress`:
    torch's progress bar on stderr."""
    path = cached_file(url)
    if os.path.exists(path):
        return path
    try:  # can the cache be written? Then whatever goes wrong below is the download's fault
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=os.path.dirname(path)))
    except OSError as e:
        raise CheckpointError(
            f"cannot write torch hub's cache {os.path.dirname(path)} ({e.strerror}): set "
            f"TORCH_HOME to a folder you can write, or download {url} yourself"
        ) from None
    try:
        torch.hub.download_url_to_file(url, path, progress=progress)
    except Exception as e:  # URLError, a reset connection, a timeout, an HTTP error: no file left
        raise CheckpointError(
            f"could not download {url} ({type(e).__name__}: {e}). Looked for {path}: download "
            f"it by hand and put it there"
        ) from None
    return path


def published(model, configs, urls):
    """The file in `urls` for `model`'s size (the name of its .config in `configs`), downloaded
    once."""
    name = next((name for name, config in configs.items() if config == model.config), None)
    if name not in urls:
        raise CheckpointError(
            f"no published weights for a {type(model).__name__} of configuration {model.config} "
            f"(those with published weights: {', '.join(urls)})"
        )
    return download(urls[name])


def load_backbone(model, state_dict, source):
    """Load pretrained weights into every tensor of `model` but ARC's and the head's: all must be
    present with the right shapes. The head is loaded only when its shape fits; else it stays as
    initialised, with a warning."""
    own = model.state_dict()
    backbone = {k: v for k, v in own.items() if k not in arc_state_dict(model, "head")}
    heads = {k: v for k, v in own.items() if k.startswith("head.")}
    body = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    mismatch = state_dict_mismatch(backbone, body)
    if mismatch:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: {mismatch} (is it a checkpoint of "
            f"this architecture and size?)"
        )
    if all(k in state_dict and state_dict[k].shape == v.shape for k, v in heads.items()):
        body.update({k: state_dict[k] for k in heads})
    else:
        shapes = [tuple(state_dict[k].shape) for k in heads if k in state_dict]
        warnings.warn(
            f"head not loaded from {source} (file {shapes or 'none'}, model "
            f"{[tuple(v.shape) for v in heads.values()]}): it starts from its initialisation",
            stacklevel=3,
        )
    model.load_state_dict(body, strict=False)
    return model


def convert_npz(arrays):
    """Google's .npz names and layouts -> this model's (timm's) state dict, less pre_logits."""
    prefix = next((k[:-16] for k in arrays if k.endswith("embedding/kernel")), None)
    if prefix is None:
        raise KeyError("embedding/kernel")
    a = {
        k[len(prefix) :]: torch.from_numpy(np.asarray(v, dtype=np.float32))
        for k, v in arrays.items()
        if k.startswith(prefix)
    }
    sd = {
        "patch_embed.proj.weight": a["embedding/kernel"].permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": a["embedding/bias"],
        "cls_token": a["cls"],
        "pos_embed": a["Transformer/posembed_input/pos_embedding"],
        "norm.weight": a["Transformer/encoder_norm/scale"],
        "norm.bias": a["Transformer/encoder_norm/bias"],
    }
    if "head/kernel" in a:
        sd["head.weight"] = a["head/kernel"].T
        sd["head.bias"] = a["head/bias"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        src = f"Transformer/encoderblock_{i}/"
        dst = f"blocks.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        qkv = ("query", "key", "value")  # kernels (dim, heads, head_dim), biases (heads, head_dim)
        sd[dst + "attn.qkv.weight"] = torch.cat([a[f"{att}{n}/kernel"].flatten(1).T for n in qkv])
        sd[dst + "attn.qkv.bias"] = torch.cat([a[f"{att}{n}/bias"].flatten() for n in qkv])
        sd[dst + "attn.proj.weight"] = a[att + "out/kernel"].flatten(0, 1).T  # (heads, hd, dim)
        sd[dst + "attn.proj.bias"] = a[att + "out/bias"]
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            sd[f"{dst}{ours}.weight"] = a[f"{src}{theirs}/scale"]
            sd[f"{dst}{ours}.bias"] = a[f"{src}{theirs}/bias"]
        for ours, theirs in (("mlp.fc1", "MlpBlock_3/Dense_0"), ("mlp.fc2", "MlpBlock_3/Dense_1")):
            sd[f"{dst}{ours}.weight"] = a[f"{src}{theirs}/kernel"].T  # Dense kernels are (in, out)
            sd[f"{dst}{ours}.bias"] = a[f"{src}{theirs}/bias"]
        i += 1
    return sd


def resize_pos_embed(pos_embed, num_patches):
    """Interpolate the patch-grid part of (1, 1 + g*g, d) position embeddings to num_patches; keep
    cls."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = int(grid.shape[1] ** 0.5), int(num_patches**0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def read_checkpoint(path):
    """The state dict in a weights file: a Google .npz (converted to timm's names), or a torch file
    (.pth, .bin, .pt), also when nested under 'model' or 'state_dict' (Microsoft's layout)."""
    npz = str(path).endswith(".npz")
    try:
        if npz:
            with np.load(path) as arrays:
                state_dict = dict(arrays)  # reads every array: a truncated one fails here
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about a pickle it then refuses
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
        # torch's or numpy's own words; their first sentence says what is wrong, and the rest may
        # suggest loading the file unsafely, which a weights file never needs
        kind = "a Google ViT .npz" if npz else "a torch state dict"
        reason = str(e).partition("\n")[0].split(". ")[0]
        raise CheckpointError(
            f"{path}: unreadable as {kind} ({type(e).__name__}: {reason})"
        ) from None
    if npz:
        try:
            return convert_npz(state_dict)
        except KeyError as e:
            raise CheckpointError(f"{path}: not a Google ViT checkpoint: no array {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(state_dict, dict):
            state_dict = state_dict.get(key, state_dict)
    if not isinstance(state_dict, dict) or not all(map(torch.is_tensor, state_dict.values())):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return state_dict


def load_pretrained(model, path):
    """Load a Google .npz or a timm-style ViT state dict into `model` (ARC or plain), resizing
    position embeddings when the image size differs from the checkpoint's. "auto": the published
    checkpoint of the model's size (URLS); "augreg": Google's AugReg one (AUGREG_URLS); downloaded
    once."""
    published_urls = {"auto": URLS, "augreg": AUGREG_URLS}
    if path in published_urls:
        path = published(model, CONFIGS, published_urls[path])
    sd = read_checkpoint(path)
    pos = sd.get("pos_embed")
    if (
        pos is not None
        and pos.shape[-1] == model.pos_embed.shape[-1]
        and pos.shape != model.pos_embed.shape
    ):
        warnings.warn(
            f"position embeddings resized from {pos.shape[1] - 1} to "
            f"{model.pos_embed.shape[1] - 1} patches",
            stacklevel=2,
        )
        sd["pos_embed"] = resize_pos_embed(pos, model.pos_embed.shape[1] - 1)
    return load_backbone(model, sd, path)
