"""Swin Transformer (Liu et al., 2021) from scratch, with optional ARC adapters (arc.py), and its
published weights. Depends on torch, torchvision (its stochastic depth), arc.py and vit.py (whose
weight-file readers it shares): copy the three files together.

    model = swin_b(num_classes=47, arc="arc")  # or arc="arc_att", or arc=None (plain Swin)
    load_pretrained(model, "auto")  # Microsoft's 22k-to-1k weights, downloaded once
    load_pretrained(model, "swin_base_patch4_window7_224_22k.pth")  # or Microsoft's, timm's file
    logits = model(images)  # images: (B, 3, 224, 224), ImageNet mean/std

Parameter names follow Microsoft's release (layers.{s}.blocks.{j}.attn.qkv, layers.{s}.downsample at
the end of stages 0-2, head), so its .pth files load as they are; timm >= 0.9 state dicts are
renamed on loading. The relative position index and shifted-window mask are rebuilt, never read from
a file.

ARC shares its projections per stage, since stage widths differ: layers.{s}.down_proj_att/_ffn (W),
and layers.{s}.blocks.{j}.adapter_{att,ffn} (c, b), filled in by arc.add_adapters. Both adapters
transform a LayerNorm output, so arc.reparameterize(model) folds them into attn.qkv and mlp.fc1 as
for the ViT: the method as the paper describes it, at zero inference cost. The official ARC Swin
code (Model/ARC_swin_b.py), which produced the paper's Swin numbers, puts the FFN adapter on the
residual stream instead, x = A_ffn(x); x = x + MLP(norm2(x)), where it changes the skip path too and
cannot be folded: ffn_adapter="residual" builds that, for an exact reproduction.

As in the official ARC Swin code: `drop_path` is the stochastic-depth rate of the last block, the
rates rising linearly from 0 at the first (its runs used 0.1); the classifier head starts
truncated-normal (std 0.02), its bias zero. Drop-path has no parameters, so state dicts do not
change.
"""

import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from arc import METHODS, ARCAdapter, SharedProjection
from vit import Mlp, load_backbone, published, read_checkpoint

CONFIGS = {  # name -> width of the first stage, blocks per stage, heads per stage
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_l": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
# What a block's adapter slots feed, for each place of the FFN-side adapter: in front of fc1
# (foldable), or on the residual stream, in front of norm2 and the skip path (the official ARC
# Swin's, not foldable)
FEEDS = {
    "norm2": {"adapter_att": ["attn.qkv"], "adapter_ffn": ["mlp.fc1"]},
    "residual": {"adapter_att": ["attn.qkv"], "adapter_ffn": ["norm2"]},
}
# Pre-trained on ImageNet-22k, then fine-tuned on ImageNet-1k (Microsoft's model zoo): what the
# official ARC Swin code's `pretrained=True` loads (its default_cfgs name the 22kto1k file), though
# the paper's text suggests the 22k-only files. Those (e.g.
# .../v1.0.0/swin_base_patch4_window7_224_22k.pth) still load by path: the same names and shapes but
# for the 21841-class head, which is then left out.
URLS = {
    "swin_t": "https://github.com/SwinTransformer/storage/releases/download/v1.0.8/"
    "swin_tiny_patch4_window7_224_22kto1k_finetune.pth",
    "swin_s": "https://github.com/SwinTransformer/storage/releases/download/v1.0.8/"
    "swin_small_patch4_window7_224_22kto1k_finetune.pth",
    "swin_b": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_base_patch4_window7_224_22kto1k.pth",
    "swin_l": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_large_patch4_window7_224_22kto1k.pth",
}


def to_windows(x, window):
    """(B, H, W, C) -> (B * num_windows, window * window, C), windows row-major in each image."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(-1, window * window, C)


def from_windows(x, window, H, W):
    """The inverse of to_windows: (B * num_windows, window * window, C) -> (B, H, W, C)."""
    x = x.view(-1, H // window, W // window, window, window, x.shape[-1]).transpose(2, 3)
    return x.reshape(-1, H, W, x.shape[-1])


def relative_position_index(window):
    """(N, N) index into the ((2w-1)^2, heads) bias table for each pair of tokens in a window, N =
    w*w."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N), each in [0, 2w-2]
    return delta[0] * (2 * window - 1) + delta[1]


def shift_mask(resolution, window, shift):
    """(num_windows, N, N): -100 between tokens that the cyclic shift brought together from
    different regions of the image (they are not neighbours), 0 elsewhere. Microsoft's value and
    regions."""
    # per axis, three regions: untouched, the last window, wrapped around
    band = torch.zeros(resolution, dtype=torch.long)
    band[-window:] = 1
    band[-shift:] = 2
    region = (band[:, None] * 3 + band[None, :])[None, :, :, None]
    region = to_windows(region, window).squeeze(-1)  # (num_windows, N)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v in one matmul; ARC folds into it as one
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window), persistent=False
        )

    def forward(self, x, mask=None):
        """x: (B * num_windows, N, C); mask: None or (num_windows, N, N), added to the logits."""
        B, N, C = x.shape
        # Windows are image-major in x. Attending as (images, windows * heads, N, head_dim) lets one
        # (windows * heads, N, N) bias broadcast over the images instead of being copied for each
        # one.
        windows = 1 if mask is None else len(mask)
        qkv = self.qkv(x).view(B // windows, windows, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).flatten(2, 3)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, heads)
        bias = bias.permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = (bias + mask[:, None]).flatten(0, 1)  # (windows * heads, N, N)
        # 4-D, (1, ..., N, N): given a 3-D mask, torch's fused CPU kernel is skipped for the slow
        # path
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype))
        x = x.view(B // windows, windows, self.heads, N, -1)  # (images, windows, heads, N, hd)
        x = x.transpose(2, 3)  # (images, windows, N, heads, hd)
        return self.proj(x.reshape(B, N, C))


class Block(nn.Module):
    """x = x + W-MSA(A_att(LN1(x))); x = x + FFN(A_ffn(LN2(x))), the attention over (shifted)
    windows.

    The adapters are identities until the model puts ARC's there (SwinTransformer). The attention
    adapter acts on the normed tokens before the window partition: it is token-wise, so
    the order does not matter, and it stays right in front of qkv for folding.
    """

    def __init__(
        self,
        dim,
        heads,
        resolution,
        window,
        shift,
        drop_path=0.0,
        ffn_adapter="norm2",
    ):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.shift = shift
        self.ffn_adapter = ffn_adapter
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)  # vit.py's: fc1, GELU, fc2, its dropout left at 0
        # stochastic depth, one rate for both branches: a whole sample's branch is dropped
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.adapter_feeds = FEEDS[ffn_adapter]  # where arc.reparameterize folds the adapters
        self.adapter_att = nn.Identity()
        self.adapter_ffn = nn.Identity()
        self.register_buffer(
            "attn_mask", shift_mask(resolution, window, shift) if shift else None, persistent=False
        )

    def forward(self, x):  # x: (B, H * W, C)
        B, L, C = x.shape
        H = W = self.resolution
        h = self.adapter_att(self.norm1(x)).view(B, H, W, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = from_windows(self.attn(to_windows(h, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(h.reshape(B, L, C))
        if (
            self.ffn_adapter == "residual"
        ):  # the official ARC Swin: the skip path carries A_ffn(x) too
            x = self.adapter_ffn(x)
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return x + self.drop_path(self.mlp(self.adapter_ffn(self.norm2(x))))


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens -> one token: (B, H*W, C) -> (B, H*W/4, 2C)."""

    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        x = x.view(B, self.resolution, self.resolution, C)
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x.view(B, L // 4, 4 * C)))


class Stage(nn.Module):
    """Blocks at one resolution, alternating plain and shifted windows, then (but last) a patch
    merging. Under ARC it owns the stage's shared projections (W): the stages differ in width.
    drop_paths: one stochastic-depth rate per block."""

    def __init__(
        self,
        dim,
        depth,
        heads,
        resolution,
        window,
        downsample,
        drop_paths,
        ffn_adapter,
    ):
        super().__init__()
        shift = window // 2
        if resolution <= window:  # Microsoft's rule: one window covers the map, nothing to shift
            window, shift = resolution, 0
        self.blocks = nn.ModuleList(
            Block(dim, heads, resolution, window, shift if j % 2 else 0, drop_paths[j], ffn_adapter)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else nn.Identity()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class SwinTransformer(nn.Module):
    def __init__(
        self,
        dim,
        depths,
        heads,
        window=7,
        patch_size=4,
        num_classes=1000,
        img_size=224,
        arc=None,
        rank=50,
        adapter_dropout=0.1,
        drop_path=0.0,
        ffn_adapter="norm2",
    ):
        super().__init__()
        if arc not in (None, *METHODS):
            raise ValueError(f"arc must be None or one of {list(METHODS)}, not {arc!r}")
        if ffn_adapter not in FEEDS:
            raise ValueError(
                f"ffn_adapter must be 'norm2' (foldable) or 'residual' (the official ARC Swin's), "
                f"not {ffn_adapter!r}"
            )
        # else arc.add_adapters would later feed its adapter to fc1
        if ffn_adapter == "residual" and not arc:
            raise ValueError(
                "ffn_adapter='residual' places ARC's FFN adapter: build the model with arc='arc'"
            )
        self.config = (dim, tuple(depths), tuple(heads))
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), not {drop_path}")
        stride = patch_size * 2 ** (len(depths) - 1)  # each patch merging halves the map
        if img_size % stride:
            raise ValueError(
                f"img_size {img_size} is not a multiple of {stride} (patch {patch_size}, "
                f"{len(depths) - 1} patch mergings)"
            )
        resolutions = [img_size // patch_size // 2**s for s in range(len(depths))]
        for s, res in enumerate(resolutions):
            if res > window and res % window:
                raise ValueError(
                    f"img_size {img_size} gives a {res}x{res} map in stage {s}, which does not "
                    f"split into {window}x{window} windows (window 7 needs a multiple of 224)"
                )
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(dim)
        # one stochastic-depth rate per block, over all blocks of all stages
        rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList(
            Stage(
                dim * 2**s,
                depth,
                heads[s],
                resolutions[s],
                window,
                s < len(depths) - 1,
                rates[sum(depths[:s]) : sum(depths[: s + 1])],
                ffn_adapter,
            )
            for s, depth in enumerate(depths)
        )
        final_dim = dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(final_dim)
        self.head = nn.Linear(final_dim, num_classes)
        # the official ARC Swin's head init (its ViT's is zeros): timm's trunc_normal_(std=0.02),
        # whose bounds are absolute, +-2: 100 std, so in effect a normal distribution
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # ARC: per stage (the stages differ in width) and position one W, shared by the adapters of
        # the stage's blocks
        for s, stage in enumerate(self.layers):
            if arc:
                stage.down_proj_att = SharedProjection(dim * 2**s, rank)
                for block in stage.blocks:
                    block.adapter_att = ARCAdapter(stage.down_proj_att, "att", adapter_dropout)
            if arc == "arc":
                stage.down_proj_ffn = SharedProjection(dim * 2**s, rank)
                for block in stage.blocks:
                    block.adapter_ffn = ARCAdapter(stage.down_proj_ffn, "ffn", adapter_dropout)

    def forward(self, images):
        x = self.patch_embed.norm(self.patch_embed.proj(images).flatten(2).transpose(1, 2))
        for stage in self.layers:
            x = stage(x)
        return self.head(self.norm(x).mean(dim=1))


swin_t = partial(SwinTransformer, *CONFIGS["swin_t"])
swin_s = partial(SwinTransformer, *CONFIGS["swin_s"])
swin_b = partial(SwinTransformer, *CONFIGS["swin_b"])
swin_l = partial(SwinTransformer, *CONFIGS["swin_l"])


def load_pretrained(model, path):
    """Load a Microsoft Swin .pth or a timm (>= 0.9) Swin state dict into `model` (ARC or plain).
    "auto": the published checkpoint of the model's size (URLS), downloaded once."""
    path = published(model, CONFIGS, URLS) if path == "auto" else path
    sd = read_checkpoint(path)
    # Microsoft merges patches at the end of a stage, so its stage 0 always has a downsample; timm
    # merges at the start of the next one, so its stage 0 never does (timm's own test). The head
    # cannot tell them apart: headless files have none.
    timm_layout = "layers.0.downsample.reduction.weight" not in sd
    renamed = {}
    for key, value in sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # derived from the window size: rebuilt by the model, never read
        if timm_layout:
            key = re.sub(
                r"^layers\.(\d+)\.downsample\.",
                lambda m: f"layers.{int(m[1]) - 1}.downsample.",
                key,
            )
            key = re.sub(r"^head\.fc\.", "head.", key)
        renamed[key] = value
    return load_backbone(model, renamed, path)
