"""ARC: Adapter Re-Composing (Dong et al., NeurIPS 2023, arXiv 2310.06234), on any pre-norm
transformer. Depends on torch alone: copy this file into your project.

For a token feature h in R^d (a LayerNorm output), layer l and one adapter position (attention side
or FFN side), the adapter is

    A_l(h) = h + dropout(h W diag(c_l)) W^T + b_l

    W   in R^{d x r}  the down-projection (SharedProjection), shared by every layer at one
                      position; its transpose W^T is the up-projection: there is no second matrix
    c_l in R^r        the re-scaling vector of layer l (ARCAdapter.scale): it re-composes W
    b_l in R^d        the bias of layer l (ARCAdapter.bias)

A pre-norm block becomes x = x + MHA(A_att,l(LN1(x))), x = x + FFN(A_ffn,l(LN2(x))). Only W_att,
W_ffn, every c_l and b_l and the classifier head train: 2 (d r + L (r + d)) parameters (+ head),
0.13M for a ViT-B/16 with r = 50 and a 47-class head. A Swin, whose stages differ in width, gets a W
per stage.

A_l is linear, so it folds into the layer it feeds. Without dropout (in eval mode), A_l(h) = h M_l +
b_l with M_l = I + W diag(c_l) W^T. Let that layer be y = a V^T + beta, its input a = A_l(h), its
weight V in R^{out x d}. Then y = h M_l V^T + (beta + V b_l) = h (V M_l^T)^T + (beta + V b_l), and
M_l is symmetric (M_l^T = M_l), so the folded layer is V' = V M_l, beta' = beta + V b_l.
reparameterize(model) does this for every adapter and removes them all: zero inference cost.

The file reads in the paper's order: the method (SharedProjection, ARCAdapter, fold,
reparameterize), then what trains and is saved (mark_trainable, arc_state_dict,
load_arc_state_dict). Models built for ARC, like vit.py and swin.py, call their adapters in their
blocks' forward. After that comes "ARC on a model you already have": add_adapters puts adapters into
a timm, torchvision, transformers or open_clip model, whose forward does not call them, with forward
hooks:

    arc.add_adapters(model)          # rank 50, both positions, adapter dropout 0.1
    arc.mark_trainable(model)        # W, every c_l and b_l, and the head; the rest is frozen
    ...train...
    torch.save(arc.arc_state_dict(model), "adapters.pth")
    arc.reparameterize(model)        # the original model again, its qkv and fc1 weights changed
"""

import os
import re

import torch
import torch.nn as nn


class SharedProjection(nn.Module):
    """W in R^{d x r}: the down-projection shared by all adapters at one position (and width)."""

    def __init__(self, dim, rank):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, rank))
        nn.init.xavier_uniform_(self.weight)  # the official init: h W keeps about the scale of h


class ARCAdapter(nn.Module):
    """A_l(h) = h + dropout(h W diag(c_l)) W^T + b_l, for one layer at one position.

    `down_proj` is the position's SharedProjection, owned by the model and shared by every layer.
    An adapter refers to it without registering it as a submodule, so adapter.to() does not move W,
    the adapter's state_dict() leaves W out, and the model saves and trains W once.

    `position` ("att" or "ffn") sets c_l's first value as the official code does: zeros on the
    attention side, so that the adapter starts as the identity, xavier-uniform on the FFN side.
    """

    def __init__(self, down_proj, position, dropout=0.1):
        super().__init__()
        dim, rank = down_proj.weight.shape
        object.__setattr__(self, "down_proj", down_proj)  # a plain reference, not a submodule
        self.dropout = nn.Dropout(dropout)
        # b_l starts at zero, so that c_l alone shapes the adapter at first
        self.bias = nn.Parameter(torch.zeros(dim))
        # c_l. The official FFN-side init is xavier-uniform, as a (1, r) matrix. With c_l = 0, as on
        # the attention side, W gets no gradient from this adapter until c_l moves.
        self.scale = nn.Parameter(torch.zeros(rank))
        if position == "ffn":
            nn.init.xavier_uniform_(self.scale.data.view(1, rank))

    def forward(self, h):  # h: (..., d), the normed tokens
        down = self.down_proj.weight  # W: (d, r)
        low_rank = self.dropout((h @ down) * self.scale)  # h W diag(c_l): (..., r)
        return h + low_rank @ down.T + self.bias  # back up through W^T: (..., d)


@torch.no_grad()
def fold(adapter, layer):
    """Fold `adapter` into the nn.Linear (or nn.MultiheadAttention's q, k, v projection) that it
    feeds, in place: V' = V M_l, beta' = beta + V b_l, V being the layer's weight and beta its bias.
    It computes in float64, as V + ((V W) diag(c_l)) W^T, which never forms the d x d matrix M_l.
    Returns V b_l, which the caller places itself when the layer has no bias (see
    reparameterize)."""
    layer_weight, layer_bias = _weight_and_bias(layer)
    weight = layer_weight.double()  # V: (out, d)
    down = adapter.down_proj.weight.double()  # W: (d, r)
    shift = weight @ adapter.bias.double()  # V b_l: (out,)
    layer_weight.copy_(weight + ((weight @ down) * adapter.scale.double()) @ down.T)
    if layer_bias is not None:
        layer_bias.copy_(layer_bias.double() + shift)
    return shift


@torch.no_grad()
def reparameterize(model):
    """Fold every ARCAdapter into the layers it feeds, then remove the adapters, their hooks and the
    shared projections. The model keeps its class, its modules and exactly its original state_dict()
    keys (it loads strict=True into the model built without ARC); in eval mode its outputs are the
    adapted model's.

    A block holding adapters says what each one feeds in its `adapter_feeds` ({adapter's name:
    names of layers in the block}): vit.py's and swin.py's blocks themselves, others by
    add_adapters."""
    adapters = [(name, m) for name, m in model.named_modules() if isinstance(m, ARCAdapter)]
    unfoldable = [
        name for name, _ in adapters if not all(_foldable(f) for f, _ in _feeds(model, name))
    ]
    if unfoldable:
        raise ValueError(
            f"{unfoldable[0]} ({len(unfoldable)} adapters) transforms the input of a norm, and "
            f"with it the residual stream (the official ARC Swin's FFN side): no weight can "
            f"absorb it"
        )
    for name, adapter in adapters:
        for layer, parent in _feeds(model, name):
            shift = fold(adapter, layer)
            if _weight_and_bias(layer)[1] is None:  # a key projection, or timm's BEiT's qkv
                _place_bias_shift(parent, shift)
    for module in list(model.modules()):
        hooks = vars(module).pop("adapter_hooks", [])  # a block that add_adapters hooked
        for handle in hooks:
            handle.remove()
        for name, child in list(module.named_children()):
            if isinstance(child, SharedProjection) or (hooks and isinstance(child, ARCAdapter)):
                delattr(module, name)
            elif isinstance(child, ARCAdapter):  # called by its block (vit.py, swin.py)
                setattr(module, name, nn.Identity())
        if hooks:
            del module.adapter_feeds
    return model


def _feeds(model, adapter_name):
    """(layer, its parent) for each layer that the adapter of this name feeds, as its block says in
    its adapter_feeds."""
    block_name, _, attribute = adapter_name.rpartition(".")
    block = model.get_submodule(block_name)
    names = block.adapter_feeds[attribute]
    return [(block.get_submodule(n), block.get_submodule(n.rpartition(".")[0])) for n in names]


def _foldable(layer):
    return isinstance(layer, (nn.Linear, nn.MultiheadAttention))


def _weight_and_bias(layer):
    """The (out, d) weight and the bias that a linear layer applies: q, k and v together for an
    nn.MultiheadAttention."""
    if isinstance(layer, nn.MultiheadAttention):
        return layer.in_proj_weight, layer.in_proj_bias
    return layer.weight, layer.bias


def is_arc(module):
    return isinstance(module, (SharedProjection, ARCAdapter))


def mark_trainable(model, head="auto"):
    """Freeze everything but the ARC tensors and the classifier head; return the number of trainable
    parameters. head: "auto" (the classifier heads that the model's family names, see HEADS), the
    name of the head module, or None for no head."""
    trainable = arc_state_dict(model, head).keys()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def arc_state_dict(model, head="auto"):
    """The tensors ARC trains: every adapter and shared W, and the classifier head (see
    mark_trainable)."""
    prefixes = [f"{name}." for name, module in model.named_modules() if is_arc(module)]
    prefixes += [f"{name}." for name in _heads(model, head)]
    state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items() if k.startswith(tuple(prefixes))}


def load_arc_state_dict(model, state_dict, head="auto"):
    """Load an arc_state_dict() into `model` (its frozen weights already loaded); the names and
    shapes must match exactly."""
    mismatch = state_dict_mismatch(arc_state_dict(model, head), state_dict)
    if mismatch:
        raise ValueError(
            f"adapter checkpoint does not fit this model: {mismatch} (saved from another model, "
            f"method or rank?)"
        )
    model.load_state_dict(state_dict, strict=False)
    return model


def state_dict_mismatch(expected, given):
    """What keeps the state dict `given` from being `expected`'s names and shapes, in words; "" when
    nothing does."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        return (
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shapes file vs model {wrong[:4]}"
        )
    return ""


# --------------------------------------------------------------------------------------------------
# ARC on a model you already have: add_adapters, the families it recognises, their heads, and the
# hooks that make a block's adapter act although the block's forward does not call it.

# method -> its adapter positions (vit.py and swin.py check their `arc` against it too)
METHODS = {"arc": ("att", "ffn"), "arc_att": ("att",)}


def add_adapters(model, rank=50, method="arc", dropout=0.1, targets=None):
    """Insert ARC into `model` in place and return it: per position ("att"; for method "arc" also
    "ffn") one shared W per width, and per block one adapter (c_l, b_l) in front of the layers it
    feeds.

    targets: {position: pattern or [patterns]} naming the nn.Linear or nn.MultiheadAttention layers
    whose input (the normed tokens) the adapter transforms, e.g. "blocks.*.attn.qkv". A pattern may
    follow any prefix; '*' stands for one part of a name and marks the block: the layers that one
    block sends the same tokens to (its q, k and v projections) share one adapter. "{q,k,v}_proj"
    stands for three names. "a:b" names a module a whose input is transformed, and the linear layer
    a.b that a applies to all of it: by F.linear on its weight (timm's BEiT, torchvision's Swin), or
    by calling it, where hooking a rather than b also lets torch.fx trace the adapter (fx does not
    enter an nn.Linear, nor run its hooks). None: the targets of the model's family in FAMILIES.

    W becomes <owner>.down_proj_<position>, the owner being the closest module that holds every
    block of that width ("_<width>" is added when it holds several widths); an adapter becomes
    <block>.adapter_<position>. A block with an nn.Identity there, which its forward calls (vit.py,
    swin.py), gets the adapter in its place; other blocks get forward hooks.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, not {method!r}")
    positions = METHODS[method]
    if targets is None:
        targets = recognise(model)
    elif set(targets) != set(positions):
        raise ValueError(
            f"method {method!r} adapts the positions {list(positions)}: targets has "
            f"{sorted(targets)}"
        )
    modules = dict(model.named_modules())
    rotary = any("Rotary" in type(module).__name__ for module in modules.values())
    # (position, W's owner, W's name, {block: sites}): all checked before anything changes
    plan = []
    for position in positions:
        by_width = {}  # the width d of the tokens -> {block: sites}
        for block, sites in _blocks(model, modules, targets[position], position).items():
            _check_block(modules[block], block, position, sites, rotary)
            width = _weight_and_bias(sites[0][1])[0].shape[-1]
            by_width.setdefault(width, {})[block] = sites
        owners = {width: _owner(modules, blocks) for width, blocks in by_width.items()}
        for width, blocks in by_width.items():
            owner = owners[width]
            name = f"down_proj_{position}"
            if (
                list(owners.values()).count(owner) > 1
            ):  # several widths share it: W's name says which
                name += f"_{width}"
            _check_free(modules[owner], owner, name)
            plan.append((position, modules[owner], name, blocks))
    for position, owner, name, blocks in plan:
        # the new tensors go where the layers they feed are, in their dtype
        like = _weight_and_bias(next(iter(blocks.values()))[0][1])[0]
        down_proj = SharedProjection(like.shape[-1], rank).to(like.device, like.dtype)
        setattr(owner, name, down_proj)
        for block, sites in blocks.items():
            _attach(modules[block], position, down_proj, sites, dropout, model.training)
    return model


# Where each family's pre-norm blocks send their normed tokens: position -> the modules that an
# adapter feeds (see add_adapters for the patterns). The first family whose every pattern names a
# module of the model is the model's. Module names read off timm 1.0.31, torchvision 0.29,
# transformers 5.25 and open_clip 3.3.
FAMILIES = {
    "timm ViT, DeiT, DINOv2, BEiT, EVA, Swin; vit.py, swin.py": {
        "att": "blocks.*.attn:qkv",
        "ffn": "blocks.*.mlp:fc1",
    },
    "torchvision ViT": {"att": "encoder.layers.*.self_attention", "ffn": "encoder.layers.*.mlp:0"},
    "torchvision Swin": {"att": "features.*.*.attn:qkv", "ffn": "features.*.*.mlp:0"},
    "transformers ViT, DeiT, BEiT, ViTMAE": {
        "att": "layers.*.attention.{q,k,v}_proj",
        "ffn": "layers.*.mlp.fc1",
    },
    "transformers Dinov2": {
        "att": "encoder.layer.*.attention.{q,k,v}_proj",
        "ffn": "encoder.layer.*.mlp.fc1",
    },
    "transformers Swin": {
        "att": "encoder.layers.*.blocks.*.attention.{q,k,v}_proj",
        "ffn": "encoder.layers.*.blocks.*.mlp.fc1",
    },
    "transformers CLIPModel, SiglipModel (the vision tower)": {
        "att": "vision_model.encoder.layers.*.self_attn.{q,k,v}_proj",
        "ffn": "vision_model.encoder.layers.*.mlp.fc1",
    },
    "transformers CLIPVisionModel, SiglipVisionModel": {
        "att": "encoder.layers.*.self_attn.{q,k,v}_proj",
        "ffn": "encoder.layers.*.mlp.fc1",
    },
    "transformers 4.x ViT, Data2VecVision": {
        "att": "encoder.layer.*.attention.attention.{query,key,value}",
        "ffn": "encoder.layer.*.intermediate.dense",
    },
    "open_clip CLIP (the visual tower)": {
        "att": "visual.transformer.resblocks.*.attn",
        "ffn": "visual.transformer.resblocks.*.mlp.c_fc",
    },
    "open_clip VisionTransformer": {
        "att": "transformer.resblocks.*.attn",
        "ffn": "transformer.resblocks.*.mlp.c_fc",
    },
}


# The classifier heads that head="auto" trains: those of these names that are an nn.Linear. timm,
# vit.py, swin.py and torchvision's Swin: head (a distilled DeiT adds head_dist, half its logits);
# timm's Swin: head.fc; torchvision's ViT: heads.head; transformers: classifier, or for a DeiT with
# teacher cls_classifier and distillation_classifier. A pooling module of the backbone that bears
# one of these names (SigLIP's attention-pooling head) is no nn.Linear, so it stays frozen.
HEADS = (
    "head",
    "head_dist",
    "head.fc",
    "heads.head",
    "classifier",
    "cls_classifier",
    "distillation_classifier",
)


def _heads(model, head):
    """The names of the head modules to train, for mark_trainable's `head`."""
    modules = dict(model.named_modules())
    if head is None:
        return []
    if head != "auto":
        if head not in modules:
            raise ValueError(f"{type(model).__name__} has no module {head!r} to train as its head")
        return [head]
    heads = [name for name in HEADS if isinstance(modules.get(name), nn.Linear)]
    if not heads:
        raise ValueError(
            f"{type(model).__name__} has no classifier head (an nn.Linear named "
            f"{', '.join(HEADS)}): pass head=<the name of its head>, or head=None to train the "
            f"adapters alone"
        )
    return heads


def recognise(model):
    """The targets of the first family in FAMILIES whose every pattern names a module of `model`."""
    names = [name for name, _ in model.named_modules()]
    for targets in FAMILIES.values():
        if all(_matches(names, p) for listed in targets.values() for p in _expand(listed)):
            return targets
    raise ValueError(
        f"add_adapters does not recognise {type(model).__name__} (see arc.FAMILIES): name the "
        f"layers that its normed tokens feed, as in add_adapters(model, targets={{'att': ..., "
        f"'ffn': ...}}). Its first linear layers after a norm: "
        f"{', '.join(_after_norms(model)) or 'none'}"
    )


def _after_norms(model):
    """The names, with '*' for numbers, of the first linear layer after each norm, in the order in
    which the model registers its modules: a suggestion for targets."""
    names = []
    after_norm = False
    for name, module in model.named_modules():
        if "Norm" in type(module).__name__:
            after_norm = True
        elif after_norm and _foldable(module):
            pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)
            if pattern not in names:
                names.append(pattern)
            after_norm = False
    return names[:4]


def _expand(patterns):
    """A pattern or list of patterns as a list, each "{a,b}" written out: "x.{q,k}" -> x.q, x.k (a
    pattern without braces is its own one option)."""
    expanded = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        start, _, rest = pattern.partition("{")
        options, _, end = rest.partition("}")
        expanded += [start + option + end for option in options.split(",")]
    return expanded


def _matches(names, pattern):
    """The module names that a pattern's hooked module (before any ':') names: any prefix, then the
    pattern's parts, '*' being any one part."""
    parts = pattern.partition(":")[0].split(".")
    regex = r"(?:.*\.)?" + r"\.".join(
        r"[^.]+" if part == "*" else re.escape(part) for part in parts
    )
    return [name for name in names if name and re.fullmatch(regex, name)]


def _blocks(model, modules, patterns, position):
    """{block name: [(the module whose input the adapter transforms, the layer it folds into, that
    layer's name in the block)]} for one position. A block is a match cut after its last '*'
    (without '*': the matched module's parent). Every pattern must match."""
    blocks = {}
    for pattern in _expand(patterns):
        hooked_pattern, _, linear = pattern.partition(":")
        parts = hooked_pattern.split(".")
        stars = [i for i, part in enumerate(parts) if part == "*"]
        inside = len(parts) - 1 - stars[-1] if stars else 1  # how many parts lie inside a block
        matches = _matches(modules, pattern)
        if not matches:
            raise ValueError(
                f"targets[{position!r}] = {pattern!r} names no module of {type(model).__name__}"
            )
        for name in matches:
            name_parts = name.split(".")
            cut = len(name_parts) - inside
            block = ".".join(name_parts[:cut])
            layer = ".".join(name_parts[cut:] + [linear]).strip(".")
            hooked = modules[name]
            layer_module = hooked.get_submodule(linear) if linear else hooked
            blocks.setdefault(block, []).append((hooked, layer_module, layer))
    return blocks


def _check_block(block, block_name, position, sites, rotary):
    """The block can take an adapter that folds: into an empty slot that feeds what targets names
    (else the fold would go elsewhere), or hooked in front of layers that it can fold into."""
    feeds = sorted(layer_name for _, _, layer_name in sites)
    slot = f"adapter_{position}"
    if not _has_slot(block, position):
        _check_free(block, block_name, slot)
    elif feeds != sorted(block.adapter_feeds[slot]):
        raise ValueError(
            f"{block_name}.{slot} is a slot whose output feeds "
            f"{', '.join(block.adapter_feeds[slot])}, not {', '.join(feeds)}: "
            f"targets[{position!r}] must name what it feeds (or leave targets out)"
        )
    for _, layer, layer_name in sites:
        parent = block.get_submodule(layer_name.rpartition(".")[0])
        _check_foldable(f"{block_name}.{layer_name}", layer, parent, rotary)


def _check_foldable(name, layer, parent, rotary):
    if not _foldable(layer):
        raise ValueError(
            f"{name} is a {type(layer).__name__}: ARC adapters feed, and fold into, nn.Linear or "
            f"nn.MultiheadAttention layers; name those in targets"
        )
    if getattr(parent, "logit_scale", None) is not None:
        raise ValueError(
            f"{name}: its attention is cosine attention with a learned logit scale (a Swin V2's), "
            f"which normalises q and k (and in torchvision zeroes k's bias): ARC's bias would not "
            f"fold. Not supported"
        )
    if _weight_and_bias(layer)[1] is not None:
        return
    # a key projection needs no bias to fold into, nor timm's BEiT's qkv (see _place_bias_shift)
    if not (name.endswith(("key", "k_proj")) or getattr(parent, "q_bias", None) is not None):
        raise ValueError(
            f"{name} has no bias, so ARC's b_l could only be folded into it by adding a tensor "
            f"the model does not have"
        )
    if rotary:
        raise ValueError(
            f"{name} has no bias for the keys, and the model rotates its keys by their position "
            f"(rotary embeddings, as timm's EVA-02): a vector added to every key would no longer "
            f"add the same to all of a query's logits, so ARC's bias cannot be dropped there. Not "
            f"supported"
        )


@torch.no_grad()
def _place_bias_shift(parent, shift):
    """Place V b_l (fold's return) for a layer without a bias. A vector added to every key adds the
    same number to all of one query's attention logits, which the softmax ignores: the keys' share
    is dropped exactly. A key projection (transformers' BEiT) needs nothing more; timm's BEiT, whose
    qkv has no bias, adds q and v biases itself, which take the queries' and values' shares. Only
    where nothing position-dependent acts on the keys first (see _check_foldable's rotary check)."""
    if hasattr(parent, "q_bias"):
        query, _, value = shift.chunk(3)  # (3 * dim,) -> q, k, v: (dim,) each
        parent.q_bias += query.to(parent.q_bias.dtype)
        parent.v_bias += value.to(parent.v_bias.dtype)


CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)  # their users iterate every child


def _owner(modules, blocks):
    """The closest module holding every block: their longest common name, less any container."""
    parts = os.path.commonprefix([block.split(".") for block in blocks])
    while parts and isinstance(modules[".".join(parts)], CONTAINERS):
        parts.pop()
    return ".".join(parts)


def _check_free(holder, holder_name, name):
    """`holder` can take a new child `name`: not a container, and the name unused."""
    where = f"{holder_name}.{name}".lstrip(".")
    if getattr(holder, name, None) is not None:
        raise ValueError(
            f"cannot add {where}: it exists already (does the model have ARC adapters?)"
        )
    if isinstance(holder, CONTAINERS):
        raise ValueError(
            f"cannot add {where}: a {type(holder).__name__} would treat it as one of its layers"
        )


def _has_slot(block, position):
    """Whether `block`'s forward calls an empty adapter_<position> (vit.py's, swin.py's blocks)."""
    return isinstance(getattr(block, f"adapter_{position}", None), nn.Identity)


def _attach(block, position, down_proj, sites, dropout, training):
    """One adapter for `block`, in the model's mode (its dropout off in eval): into its slot, or
    hooked onto the modules it feeds, the block then saying what they are in its adapter_feeds."""
    adapter = ARCAdapter(down_proj, position, dropout)
    adapter.to(down_proj.weight.device, down_proj.weight.dtype).train(training)
    slot = f"adapter_{position}"
    if _has_slot(block, position):
        setattr(block, slot, adapter)
        return
    block.add_module(slot, adapter)
    feeds = sorted(layer_name for _, _, layer_name in sites)
    vars(block).setdefault("adapter_feeds", {})[slot] = feeds
    hooks = vars(block).setdefault("adapter_hooks", [])
    hook = AdapterHook(adapter, feeds)
    for hooked in dict.fromkeys(hooked for hooked, _, _ in sites):  # each module once
        hooks.append(hooked.register_forward_pre_hook(hook.adapt))
    hooks.append(block.register_forward_hook(hook.check))


class AdapterHook:
    """Makes `adapter` act in a block whose forward does not call it: `adapt` is a forward
    pre-hook on each module that the block sends its normed tokens to, `check` a forward hook on
    the block."""

    def __init__(self, adapter, feeds):
        self.adapter = adapter
        self.feeds = feeds  # the names of the layers it feeds, for the error
        self.pending = None  # (tokens, adapter(tokens)) while the block's forward runs

    def adapt(self, module, args):
        """The tokens, the module's first argument, become A(tokens), wherever the module is given
        them (nn.MultiheadAttention's query, key and value). Modules fed the same tensor (q, k and v
        projections) share one computation, hence one dropout mask."""
        tokens = args[0]
        # torchvision's Swin attention, given a (B, H, W, C) map (timm's is given windows); the
        # check needs a real tensor, not torch.fx's stand-in
        if (
            hasattr(module, "window_size")
            and isinstance(tokens, torch.Tensor)
            and tokens.dim() == 4
        ):
            _check_windows(module, tokens)
        if self.pending is None or self.pending[0] is not tokens:
            self.pending = (tokens, self.adapter(tokens))
        adapted = self.pending[1]
        return tuple(adapted if value is tokens else value for value in args)

    def check(self, block, args, output):
        """After the block's forward, whichever module was called first: the adapter must have
        acted. Then the adapted tokens are let go. Not while torch.fx traces the block with
        stand-ins (Proxy): fx runs no hook of the modules it keeps whole (nn.Linear, torchvision's
        MLP), but the traced graph calls those modules, and so their hooks."""
        if self.pending is None and not isinstance(output, torch.fx.Proxy):
            raise RuntimeError(
                f"ARC's adapter for {', '.join(self.feeds)} was never called in "
                f"{type(block).__name__}'s forward: those layers were not called, though the block "
                f"may use their weights with F.linear. Then name the module that receives the "
                f"tokens and the layer it applies, as 'module:linear', in targets"
            )
        self.pending = None


def _check_windows(attention, tokens):
    """torchvision's Swin attention pads a (B, H, W, C) map that its windows do not divide, after
    the hook: the padding, zeros before folding, would be the adapter's bias after it. Refused,
    rather than fold inexactly."""
    height, width = tokens.shape[1:3]
    if height % attention.window_size[0] or width % attention.window_size[1]:
        raise ValueError(
            f"a {height}x{width} map does not split into {attention.window_size[0]}x"
            f"{attention.window_size[1]} windows: torchvision's Swin would pad it, and the folded "
            f"model would differ from the adapted one. Use an image size whose maps the windows "
            f"divide (224)"
        )
