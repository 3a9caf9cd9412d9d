"""ARC: Adapter Re-Composing (Dong et al., NeurIPS 2023, arXiv 2310.06234). Depends on torch alone.

For a token feature h in R^d (a LayerNorm output), layer l and one adapter position (attention side
or FFN side), the adapter is

    A_l(h) = h + dropout(h W diag(c_l)) W^T + b_l

    W   in R^{d x r}  down-projection, SHARED by every layer at that position; its transpose W^T is
                      the up-projection, so there is no second matrix (the symmetric design)
    c_l in R^r        per-layer re-scaling vector: re-composes the shared projection for layer l
    b_l in R^d        per-layer bias

A pre-norm transformer block becomes  x = x + MHA(A_att,l(LN1(x))),  x = x + FFN(A_ffn,l(LN2(x))).
Only W_att, W_ffn, every c_l, b_l and the classifier head train: 2 (d r + L (r + d)) parameters
(+ head), 0.13M for ViT-B/16 with r = 50 and a 47-class head.

A_l is linear, so it folds into the layer it feeds. With M_l = I + W diag(c_l) W^T (symmetric) and a
following nn.Linear y = a Wt^T + beta:

    Wt' = Wt M_l,    beta' = beta + Wt b_l

reparameterize(model) does this for every adapter and removes them: zero inference cost.

Use: give each block ARCAdapter(shared, feeds=<the nn.Linear its output feeds>) between its norm and
that linear, with one SharedProjection per position owned by the model (see vit.py); then
load_backbone(model, pretrained_state_dict, path), mark_trainable(model), train,
torch.save(arc_state_dict(model), ...), reparameterize(model).
"""
import os
import warnings
import zipfile

import torch
import torch.nn as nn


class SharedProjection(nn.Module):
    """W in R^{d x r}, the down-projection shared by all adapters at one position (W^T projects up)."""

    def __init__(self, dim, rank):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, rank))
        nn.init.xavier_uniform_(self.weight)


class ARCAdapter(nn.Module):
    """A_l(h) = h + dropout(h W diag(c_l)) W^T + b_l for one layer at one position.

    `shared` is the position's SharedProjection and `feeds` the nn.Linear this adapter's output goes
    into; both are owned elsewhere in the model, so they are referenced here, not registered.
    `identity_init` starts c_l at zero (A_l = identity, the official attention side); otherwise c_l is
    xavier-uniform as a (1, r) tensor (the official FFN side).
    """

    def __init__(self, shared, feeds, dropout=0.1, identity_init=False):
        super().__init__()
        dim, rank = shared.weight.shape
        self._refs = (shared, feeds)  # a tuple hides them from parameters() and state_dict()
        self.scale = nn.Parameter(torch.zeros(rank))  # c_l
        self.bias = nn.Parameter(torch.zeros(dim))  # b_l
        self.dropout = nn.Dropout(dropout)
        if not identity_init:
            nn.init.xavier_uniform_(self.scale.data.view(1, rank))

    @property
    def down_proj(self):
        return self._refs[0].weight

    @property
    def feeds(self):
        return self._refs[1]

    def forward(self, h):
        W = self.down_proj
        return h + self.dropout((h @ W) * self.scale) @ W.T + self.bias


def is_arc(module):
    return isinstance(module, (SharedProjection, ARCAdapter))


@torch.no_grad()
def fold(adapter, linear):
    """Fold `adapter` into the nn.Linear that follows it, in place: Wt' = Wt M_l, beta' = beta + Wt b_l.

    Computed in float64 as Wt M_l = Wt + ((Wt W) diag(c_l)) W^T, which never forms the d x d matrix M_l.
    """
    weight, W = linear.weight.double(), adapter.down_proj.double()
    scale, bias = adapter.scale.double(), adapter.bias.double()
    new_bias = weight @ bias if linear.bias is None else linear.bias.double() + weight @ bias
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.empty_like(linear.weight[:, 0]))
    linear.weight.copy_(weight + ((weight @ W) * scale) @ W.T)
    linear.bias.copy_(new_bias)


def reparameterize(model):
    """Fold every ARCAdapter into the linear it feeds, then delete adapters and shared projections.

    The returned model is the plain architecture: its state_dict() loads strict=True into the same
    model built without ARC, and its outputs equal the adapted model's in eval mode.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ARCAdapter):
                fold(child, child.feeds)
                setattr(parent, name, nn.Identity())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedProjection):
                delattr(parent, name)
    return model


def arc_state_dict(model, head="head"):
    """The tensors ARC trains: every adapter and shared projection, and the classifier head `head`."""
    keep = {f"{name}." for name, module in model.named_modules() if is_arc(module) or name == head}
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if any(k.startswith(prefix) for prefix in keep)}


def mark_trainable(model, head="head"):
    """Freeze everything but the ARC tensors and the head; return the number of trainable parameters."""
    trainable = arc_state_dict(model, head).keys()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_arc_state_dict(model, state_dict, head="head"):
    """Load an arc_state_dict() into `model` (its frozen weights already loaded); names must match exactly."""
    expected = arc_state_dict(model, head).keys()
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"adapter checkpoint does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it saved from another model, method or rank?)")
    model.load_state_dict(state_dict, strict=False)
    return model


# ---------------------------------------------------------------------------------------------------
# Loading pretrained weights into a model with adapters (used by vit.py and swin.py)


class CheckpointError(ValueError):
    """A weights file that is unreadable or made for another architecture."""


def read_state_dict(path):
    """The state dict in a torch checkpoint file (.pth/.bin/.pt), also when nested under 'model' or
    'state_dict' (Microsoft's and many training scripts' layout)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of files it then refuses
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception:  # what torch says (a missing zip record, an unpickling opcode) would not tell a user why
        raise CheckpointError(f"{path}: unreadable as a torch checkpoint: it is {describe_file(path)}") from None
    for key in ("model", "state_dict"):
        sd = sd.get(key, sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return sd


def describe_file(path):
    """What the file at `path` looks like, in words, for the message about a file that would not load."""
    if os.path.isdir(path):
        return "a folder, not a file: give the checkpoint file in it"
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "an empty file (an interrupted download?)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "a zip archive cut short (an interrupted download?)"
        if names and all(name.endswith(".npy") for name in names):
            return "a NumPy .npz archive (Google's ViT format), not a torch checkpoint"
        if any(name.endswith("data.pkl") for name in names):
            return ("a torch file holding a pickled object, not a state dict of tensors (save "
                    "model.state_dict() with torch.save, not the model)")
        return "a zip archive of other files"
    if head.startswith(b"\x80"):
        return "a Python pickle, not a torch state dict (save model.state_dict() with torch.save)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        return "a web page (a server's error page saved in place of the download?)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a checkpoint in any format this loader knows"


def load_backbone(model, state_dict, source, head="head"):
    """Load pretrained weights into every tensor of `model` but ARC's: all must be present with the
    right shapes. The head is loaded only when its shape fits (else it stays as initialised)."""
    own = model.state_dict()
    own = {k: v for k, v in own.items() if k not in arc_state_dict(model, head=None)}
    is_head = lambda k: k.startswith(f"{head}.")
    missing = [k for k in own if k not in state_dict and not is_head(k)]
    unexpected = [k for k in state_dict if k not in own and not is_head(k)]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and state_dict[k].shape != v.shape and not is_head(k)]
    if missing or unexpected or wrong:
        problems = [f"{what} {names[:4]}" for what, names in
                    (("missing", missing), ("unexpected", unexpected), ("shape file vs model", wrong)) if names]
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
                              + " (is it a checkpoint of this architecture and size?)")
    head_keys = [k for k in own if is_head(k)]
    if head_keys and not all(k in state_dict and state_dict[k].shape == own[k].shape for k in head_keys):
        shapes = [tuple(state_dict[k].shape) for k in head_keys if k in state_dict]
        print(f"note: head not loaded from {source} (file {shapes or 'none'}, model "
              f"{[tuple(own[k].shape) for k in head_keys]}): it starts from its initialisation")
        state_dict = {k: v for k, v in state_dict.items() if not is_head(k)}
    model.load_state_dict(state_dict, strict=False)
    return model
