"""Vision Transformer (Dosovitskiy et al., 2021) from scratch, with optional ARC adapters (arc.py).

    model = vit_b16(num_classes=47, arc="arc")          # or arc="arc_att", or arc=None (plain ViT)
    load_pretrained(model, "ViT-B_16.npz")              # Google .npz or a timm-style state dict
    logits = model(images)                              # images: (B, 3, 224, 224), normalised

Parameter names follow timm (cls_token, pos_embed, blocks.{i}.attn.qkv, ...), so timm state dicts
load as they are; ARC adds down_proj_att/down_proj_ffn (W, shared) and blocks.{i}.adapter_{att,ffn}.

`dropout` is the official ARC ViT's "vit_drop": one rate after the position embedding, after the MLP's
GELU and after its fc2; none in attention. It has no parameters, so state dicts do not change.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from arc import ARCAdapter, CheckpointError, SharedProjection, describe_file, load_backbone, read_state_dict

# ImageNet-21k checkpoints: the original ones ARC starts from (B, L, H), and for Ti and S the AugReg ones
# timm's pretrained configs name (vit_tiny_patch16_224.augreg_in21k, vit_small_patch16_224.augreg_in21k)
URLS = {
    "vit_t16": "https://storage.googleapis.com/vit_models/augreg/"
               "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_s16": "https://storage.googleapis.com/vit_models/augreg/"
               "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_b16": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
    "vit_l16": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-L_16.npz",
    "vit_h14": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-H_14.npz",
}


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v in one matmul; ARC folds into it as one
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)  # after GELU, after fc2

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """x = x + MHA(A_att(LN1(x))); x = x + FFN(A_ffn(LN2(x))). Without ARC the adapters are identities."""

    def __init__(self, dim, heads, mlp_dim, down_proj_att=None, down_proj_ffn=None, adapter_dropout=0.1,
                 dropout=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, mlp_dim, dropout)
        self.adapter_att = self.adapter_ffn = nn.Identity()
        if down_proj_att is not None:
            self.adapter_att = ARCAdapter(down_proj_att, self.attn.qkv, adapter_dropout, identity_init=True)
        if down_proj_ffn is not None:
            self.adapter_ffn = ARCAdapter(down_proj_ffn, self.mlp.fc1, adapter_dropout)

    def forward(self, x):
        x = x + self.attn(self.adapter_att(self.norm1(x)))
        return x + self.mlp(self.adapter_ffn(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, patch_size, dim, depth, heads, mlp_dim, num_classes=1000, img_size=224,
                 arc=None, rank=50, adapter_dropout=0.1, dropout=0.0):
        super().__init__()
        if arc not in (None, "arc", "arc_att"):
            raise ValueError(f"arc must be None, 'arc' or 'arc_att', not {arc!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch_size) ** 2, dim) * 0.02)
        self.pos_drop = nn.Dropout(dropout)
        if arc:
            self.down_proj_att = SharedProjection(dim, rank)
        if arc == "arc":
            self.down_proj_ffn = SharedProjection(dim, rank)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_dim, getattr(self, "down_proj_att", None),
                  getattr(self, "down_proj_ffn", None), adapter_dropout, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)  # as the official recipe: the new task starts from zero logits
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = self.pos_drop(torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def vit_t16(**kw): return VisionTransformer(16, 192, 12, 3, 768, **kw)
def vit_s16(**kw): return VisionTransformer(16, 384, 12, 6, 1536, **kw)
def vit_b16(**kw): return VisionTransformer(16, 768, 12, 12, 3072, **kw)
def vit_l16(**kw): return VisionTransformer(16, 1024, 24, 16, 4096, **kw)
def vit_h14(**kw): return VisionTransformer(14, 1280, 32, 16, 5120, **kw)


def convert_npz(arrays):
    """Google's .npz names and layouts -> this model's (timm's) state dict. pre_logits is dropped."""
    prefix = next((k[: -len("embedding/kernel")] for k in arrays if k.endswith("embedding/kernel")), None)
    if prefix is None:
        raise KeyError("no 'embedding/kernel' array")
    a = {k[len(prefix):]: torch.from_numpy(np.asarray(v, dtype=np.float32))
         for k, v in arrays.items() if k.startswith(prefix)}
    sd = {"patch_embed.proj.weight": a["embedding/kernel"].permute(3, 2, 0, 1),  # HWIO -> OIHW
          "patch_embed.proj.bias": a["embedding/bias"], "cls_token": a["cls"],
          "pos_embed": a["Transformer/posembed_input/pos_embedding"],
          "norm.weight": a["Transformer/encoder_norm/scale"], "norm.bias": a["Transformer/encoder_norm/bias"]}
    if "head/kernel" in a:
        sd["head.weight"], sd["head.bias"] = a["head/kernel"].T, a["head/bias"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        qkv = [a[f"{att}{n}/kernel"] for n in ("query", "key", "value")]  # (dim, heads, head_dim) each
        sd.update({
            dst + "norm1.weight": a[src + "LayerNorm_0/scale"], dst + "norm1.bias": a[src + "LayerNorm_0/bias"],
            dst + "attn.qkv.weight": torch.cat([k.flatten(1).T for k in qkv]),
            dst + "attn.qkv.bias": torch.cat([a[f"{att}{n}/bias"].flatten() for n in ("query", "key", "value")]),
            dst + "attn.proj.weight": a[att + "out/kernel"].flatten(0, 1).T,  # (heads, head_dim, dim)
            dst + "attn.proj.bias": a[att + "out/bias"],
            dst + "norm2.weight": a[src + "LayerNorm_2/scale"], dst + "norm2.bias": a[src + "LayerNorm_2/bias"],
            dst + "mlp.fc1.weight": a[src + "MlpBlock_3/Dense_0/kernel"].T,
            dst + "mlp.fc1.bias": a[src + "MlpBlock_3/Dense_0/bias"],
            dst + "mlp.fc2.weight": a[src + "MlpBlock_3/Dense_1/kernel"].T,
            dst + "mlp.fc2.bias": a[src + "MlpBlock_3/Dense_1/bias"]})
        i += 1
    return sd


def resize_pos_embed(pos_embed, num_patches):
    """Interpolate the patch-grid part of (1, 1 + g*g, d) position embeddings to num_patches; keep cls."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = int(grid.shape[1] ** 0.5), int(num_patches ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def read_checkpoint(path):
    """A state dict from a Google .npz or a torch file (see arc.read_state_dict)."""
    if not str(path).endswith(".npz"):
        return read_state_dict(path)
    try:
        with np.load(path) as arrays:
            arrays = dict(arrays)  # reads every array: a truncated one fails here
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception:  # numpy's words (a pickle it will not load, a bad zip) would not say why
        raise CheckpointError(f"{path}: unreadable as a Google ViT .npz: it is {describe_file(path)}") from None
    try:
        return convert_npz(arrays)
    except KeyError as e:
        raise CheckpointError(f"{path}: not a Google ViT checkpoint: it has no array {e}") from None


def load_pretrained(model, path):
    """Load a Google .npz or a timm-style ViT state dict into `model` (ARC or plain), resizing
    position embeddings when the image size differs from the checkpoint's."""
    sd = read_checkpoint(path)
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[-1] == model.pos_embed.shape[-1] and pos.shape != model.pos_embed.shape:
        print(f"note: position embeddings resized from {pos.shape[1] - 1} to {model.pos_embed.shape[1] - 1} patches")
        sd["pos_embed"] = resize_pos_embed(pos, model.pos_embed.shape[1] - 1)
    return load_backbone(model, sd, path)
