"""ARC: Adapter Re-Composing (Dong et al., NeurIPS 2023, arXiv 2310.06234), on any pre-norm transformer.
Depends on torch alone: copy this file into your project.

For a token feature h in R^d (a LayerNorm output), layer l and one adapter position (attention side
or FFN side), the adapter is

    A_l(h) = h + dropout(h W diag(c_l)) W^T + b_l

    W   in R^{d x r}  the down-projection (down_proj in the code), SHARED by every layer at that position;
                      its transpose W^T is the up-projection, so there is no second matrix (the symmetric design)
    c_l in R^r        per-layer re-scaling vector (scale): re-composes the shared projection for layer l
    b_l in R^d        per-layer bias (bias)

A pre-norm block becomes  x = x + MHA(A_att,l(LN1(x))),  x = x + FFN(A_ffn,l(LN2(x))).  Only W_att, W_ffn,
every c_l and b_l and the classifier head train: 2 (d r + L (r + d)) parameters (+ head), 0.13M for
ViT-B/16 with r = 50 and a 47-class head. A Swin, whose stages differ in width, gets a W per width.

A_l is linear, so it folds into the layer it feeds. With M_l = I + W diag(c_l) W^T (symmetric) and a
following linear map y = a Wt^T + beta:   Wt' = Wt M_l,  beta' = beta + Wt b_l.
reparameterize(model) does this for every adapter and removes them: zero inference cost.

On a model you already have (timm and torchvision ViTs and Swins, Hugging Face ViTs, vit.py, swin.py):

    arc.add_adapters(model)                  # rank 50, both positions, adapter dropout 0.1
    arc.mark_trainable(model)                # W, every c_l and b_l, and the head; the rest is frozen
    ...train...
    torch.save(arc.arc_state_dict(model), "adapters.pth")
    arc.reparameterize(model)                # the original model again, its qkv and fc1 weights changed

add_adapters recognises the families in LAYOUTS; for any other model name, per position, the linear
layers that the normed tokens feed: add_adapters(model, targets={"att": "blocks.*.attn.qkv",
"ffn": "blocks.*.mlp.fc1"}) (see add_adapters).
"""

import re

import torch
import torch.nn as nn

METHODS = {"arc": ("att", "ffn"), "arc_att": ("att",)}  # method -> adapter positions
HEADS = (
    "head",
    "heads",
    "classifier",
)  # what timm, vit.py, swin.py; torchvision's ViT; transformers call it

# Where each family's pre-norm blocks send their normed tokens: position -> the modules an adapter feeds.
# '*' stands for one part of a module's name; a pattern may follow any prefix (transformers' "vit.").
# "a:b" names a module a whose input the adapter transforms, and its linear layer b that a applies to it
# with F.linear, so that b's own forward (and a hook on it) never runs.
LAYOUTS = {
    "timm SwinTransformer, swin.py": {
        "att": "layers.*.blocks.*.attn.qkv",
        "ffn": "layers.*.blocks.*.mlp.fc1",
    },
    "timm VisionTransformer (ViT, DeiT, DINOv2, CLIP), vit.py": {
        "att": "blocks.*.attn.qkv",
        "ffn": "blocks.*.mlp.fc1",
    },
    "torchvision VisionTransformer": {
        "att": "encoder.layers.*.self_attention",
        "ffn": "encoder.layers.*.mlp.0",
    },
    "torchvision SwinTransformer": {"att": "features.*.*.attn:qkv", "ffn": "features.*.*.mlp.0"},
    "transformers ViT": {
        "att": [
            "layers.*.attention.q_proj",
            "layers.*.attention.k_proj",
            "layers.*.attention.v_proj",
        ],
        "ffn": "layers.*.mlp.fc1",
    },
    "transformers ViT 4.x": {
        "att": [
            "encoder.layer.*.attention.attention.query",
            "encoder.layer.*.attention.attention.key",
            "encoder.layer.*.attention.attention.value",
        ],
        "ffn": "encoder.layer.*.intermediate.dense",
    },
}


class SharedProjection(nn.Module):
    """W in R^{d x r}, the down-projection shared by all adapters at one position and width."""

    def __init__(self, dim, rank):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, rank))
        nn.init.xavier_uniform_(self.weight)  # the official init: h W keeps about the scale of h


class ARCAdapter(nn.Module):
    """A_l(h) = h + dropout(h W diag(c_l)) W^T + b_l for one layer at one position.

    `down_proj` is the position's SharedProjection and `feeds` the layers its output goes into (what
    reparameterize folds it into; None where it cannot be folded). Both are owned elsewhere in the model,
    so they are referenced here, not registered. `identity_init` starts c_l at zero (the attention side).
    """

    def __init__(self, down_proj, feeds, dropout=0.1, identity_init=False):
        super().__init__()
        dim, rank = down_proj.weight.shape
        self._down_proj = (down_proj,)  # a tuple hides it from parameters() and state_dict()
        self.feeds = None if feeds is None else tuple(feeds)
        self.scale = nn.Parameter(torch.zeros(rank))  # c_l
        self.bias = nn.Parameter(
            torch.zeros(dim)
        )  # b_l: zero, so that only c_l shapes the adapter at first
        self.dropout = nn.Dropout(dropout)
        if not identity_init:
            # the official FFN side: c_l xavier-uniform, as a (1, r) matrix. With every c_l at zero the gradient
            # of W would be zero too (it is proportional to c_l), so this side's W learns from the first step
            nn.init.xavier_uniform_(self.scale.data.view(1, rank))
        # Attached by forward hooks (add_adapters, on a block without an adapter slot): the layers it feeds by
        # them, the hooks' handles, the output that the others fed the same tokens are waiting for
        self._sites, self._handles, self._pending, self._called = [], [], None, False

    @property
    def down_proj(self):
        return self._down_proj[0].weight

    def forward(self, h):
        down_proj = self.down_proj
        # W is shared by reference: nn.DataParallel's replicas never copy it (h is no tensor while torch.fx traces)
        if isinstance(h, torch.Tensor) and h.device != down_proj.device:
            raise RuntimeError(
                f"ARC's adapter got tokens on {h.device} and its shared W is on {down_proj.device}: "
                f"a model replicated by nn.DataParallel, or split over devices, is not supported; "
                f"run one device per process (DistributedDataParallel, torchrun)"
            )
        return h + self.dropout((h @ down_proj) * self.scale) @ down_proj.T + self.bias

    def _adapt_input(self, module, args, kwargs):
        """Forward pre-hook on each module this adapter feeds: its input tensor, wherever it is passed again
        (nn.MultiheadAttention's key and value), becomes A(input). Modules fed the same tensor (three q, k, v
        projections) share one computation, hence one dropout mask."""
        self._called = True
        tokens = args[0] if args else next(iter(kwargs.values()))
        if tokens.dim() == 4 and hasattr(module, "window_size"):
            _check_windows(module, tokens)
        if self._pending is not None and self._pending[0] is tokens:
            _, adapted, waiting = self._pending
            self._pending = (tokens, adapted, waiting - 1) if waiting > 1 else None
        else:
            adapted = self(tokens)
            waiting = len(self._sites) - 1
            self._pending = (tokens, adapted, waiting) if waiting else None
        swap = lambda value: adapted if value is tokens else value
        return tuple(map(swap, args)), {key: swap(value) for key, value in kwargs.items()}

    def _check_called(self, model, args, output):
        """Forward hook on the whole model: after its first forward, this adapter must have acted."""
        if not self._called:
            raise RuntimeError(
                f"ARC's adapter for {', '.join(self._sites)} was never called in {type(model).__name__}'s forward: "
                f"those layers were not called, though the model may use their weights with F.linear. Then name the "
                f"module that receives the tokens and the layer it applies, as 'module:linear', in targets"
            )


def _check_windows(attention, tokens):
    """torchvision's Swin attention pads a (B, H, W, C) map that its windows do not divide, after the hook: the
    padding, zeros before folding, would be the adapter's bias after it. Refused, rather than fold inexactly."""
    height, width = tokens.shape[1:3]
    if height % attention.window_size[0] or width % attention.window_size[1]:
        raise ValueError(
            f"a {height}x{width} map does not split into {attention.window_size[0]}x"
            f"{attention.window_size[1]} windows: torchvision's Swin would pad it, and the folded model "
            f"would differ from the adapted one. Use an image size whose maps the windows divide (224)"
        )


def is_arc(module):
    return isinstance(module, (SharedProjection, ARCAdapter))


def add_adapters(model, rank=50, method="arc", dropout=0.1, targets=None):
    """Insert ARC into `model` in place and return it: per position ("att"; for method "arc" also "ffn")
    one shared W per width, and per block one adapter (c_l, b_l) in front of the layers it feeds.

    targets: {position: pattern or [patterns]} naming the nn.Linear or nn.MultiheadAttention layers whose
    input (the normed tokens) the adapter transforms, e.g. "blocks.*.attn.qkv". '*' stands for one part of a
    name and marks the block: the layers one block sends the same tokens to (q, k and v projections) share
    one adapter. "a:b" names a module a whose input is transformed and the linear layer a.b that a applies to
    it with F.linear (torchvision's Swin attention). None: the model's family in LAYOUTS.
    A block with an nn.Identity named adapter_<position> (vit.py, swin.py) gets the adapter there, for its
    own forward to call (its dict adapter_feeds says what that slot feeds); other blocks get forward hooks.
    W is <owner>.down_proj_<position> (the owner: the closest module holding every block of that width;
    "_<width>" is added when it holds several widths), an adapter <block>.adapter_<position>.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, not {method!r}")
    targets = recognise(model) if targets is None else targets
    if not set(METHODS[method]) <= set(targets):
        raise ValueError(
            f"method {method!r} needs targets for {METHODS[method]}, got {sorted(targets)}"
        )
    modules = dict(model.named_modules())
    plan = []  # (position, its W's owner and name, width, a tensor to match, {block: sites}): all checked first
    for position in METHODS[method]:
        by_width = {}
        for block, sites in _blocks(model, modules, targets[position], position).items():
            _check_block(modules[block], block, position, sites)
            by_width.setdefault(_width(sites, block), {})[block] = sites
        owners = {width: _owner(modules, list(blocks)) for width, blocks in by_width.items()}
        for width, blocks in by_width.items():
            name = f"down_proj_{position}" + f"_{width}" * (
                list(owners.values()).count(owners[width]) > 1
            )
            _check_free(modules[owners[width]], owners[width], name)
            # the new tensors go where the layers they feed are, in their dtype
            like = next(
                (
                    p
                    for sites in blocks.values()
                    for _, layer, _, _ in sites
                    for p in layer.parameters()
                ),
                next(model.parameters(), torch.empty(0)),
            )
            plan.append((position, owners[width], name, width, like, blocks))
    for position, owner, name, width, like, blocks in plan:
        down_proj = SharedProjection(width, rank).to(like.device, like.dtype)
        modules[owner].add_module(name, down_proj)
        for block, sites in blocks.items():
            _attach(model, modules[block], position, down_proj, sites, dropout)
    return model


def recognise(model):
    """The targets of the first family in LAYOUTS whose every pattern names a module of `model`."""
    names = [name for name, _ in model.named_modules()]
    for layout in LAYOUTS.values():
        patterns = [
            _regex(p.partition(":")[0]) for listed in layout.values() for p in _listed(listed)
        ]
        if all(any(regex.fullmatch(name) for name in names) for regex in patterns):
            return layout
    raise ValueError(
        f"add_adapters does not recognise {type(model).__name__}: looked for the module names of "
        f"{'; '.join(LAYOUTS)}. Name the layers its normed tokens feed, for example add_adapters(model, "
        f"targets={{'att': 'blocks.*.attn.qkv', 'ffn': 'blocks.*.mlp.fc1'}})"
    )


def _listed(patterns):
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _regex(pattern):
    """A module-name pattern as a regex over full names: any prefix, then the parts, '*' being any one part."""
    return re.compile(
        r"(?:.*\.)?"
        + r"\.".join(r"[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    )


def _blocks(model, modules, patterns, position):
    """{block name: [(the module whose input the adapter transforms, the layer it folds into, that layer's
    name, its parent)]} for one position. A block is a match cut after its last '*' (without '*': the
    layer's parent)."""
    blocks = {}
    for pattern in _listed(patterns):
        hooked_pattern, _, linear = pattern.partition(":")
        parts = hooked_pattern.split(".")
        last_star = max((i for i, part in enumerate(parts) if part == "*"), default=len(parts) - 2)
        regex = _regex(hooked_pattern)
        for name, module in modules.items():
            if name and regex.fullmatch(name):
                name_parts = name.split(".")
                block = ".".join(name_parts[: len(name_parts) - len(parts) + last_star + 1])
                layer = module.get_submodule(linear) if linear else module
                parent = module if linear else modules[name.rpartition(".")[0]]
                blocks.setdefault(block, []).append(
                    (module, layer, f"{name}.{linear}" if linear else name, parent)
                )
    if not blocks:
        raise ValueError(
            f"targets[{position!r}] = {patterns!r} names no module of {type(model).__name__}"
        )
    return blocks


def _weight_and_bias(layer):
    """The (out x d) weight and the bias of what a linear layer computes: of q, k and v together for an
    nn.MultiheadAttention."""
    if isinstance(layer, nn.MultiheadAttention):
        return layer.in_proj_weight, layer.in_proj_bias
    return layer.weight, layer.bias


def _check_foldable(name, layer, parent):
    if not isinstance(layer, (nn.Linear, nn.MultiheadAttention)):
        raise ValueError(
            f"{name} is a {type(layer).__name__}: ARC adapters feed, and fold into, nn.Linear or "
            f"nn.MultiheadAttention layers; name those in targets"
        )
    if getattr(parent, "logit_scale", None) is not None:
        raise ValueError(
            f"{name}: its attention is cosine attention with a learned logit scale (a Swin V2's), which "
            f"normalises q and k (and in torchvision zeroes k's bias): ARC's bias would not fold. Not "
            f"supported"
        )
    weight, bias = _weight_and_bias(layer)
    if weight is None:
        raise ValueError(
            f"{name} keeps q, k and v in separate weights (kdim or vdim set): not supported"
        )
    if bias is None:
        why = (
            " (its parent adds q and v biases itself, in F.linear, as timm's EVA and BEiT do: they are not "
            "supported)"
            if getattr(parent, "q_bias", None) is not None
            else ""
        )
        raise ValueError(
            f"{name} has no bias, so ARC's b_l could only be folded into it by adding a tensor the "
            f"model does not have{why}"
        )


def _width(sites, block):
    """The width d of the tokens that one block's adapter transforms."""
    widths = set()
    for _, layer, name, _ in sites:
        if isinstance(layer, (nn.Linear, nn.MultiheadAttention, nn.LayerNorm)):
            widths.add(
                layer.in_features
                if isinstance(layer, nn.Linear)
                else layer.embed_dim
                if isinstance(layer, nn.MultiheadAttention)
                else layer.normalized_shape[-1]
            )
        else:
            raise ValueError(
                f"{name} is a {type(layer).__name__}: an adapter feeds a linear layer or a norm"
            )
    if len(widths) != 1:
        raise ValueError(
            f"the layers of {block} that one adapter feeds take different widths {sorted(widths)}"
        )
    return widths.pop()


CONTAINERS = (
    nn.ModuleList,
    nn.Sequential,
    nn.ModuleDict,
)  # their forward, or their users, iterate every child


def _owner(modules, blocks):
    """The closest module holding every block: their longest common name, less any container."""
    split = [block.split(".") for block in blocks]
    parts = split[0][
        : next(
            (i for i, part in enumerate(zip(*split)) if len(set(part)) > 1), min(map(len, split))
        )
    ]
    while parts and isinstance(modules[".".join(parts)], CONTAINERS):
        parts = parts[:-1]
    return ".".join(parts)


def _check_free(holder, holder_name, name):
    """`holder` can take a new child `name`: not a container, and the name unused."""
    where = f"{holder_name}.{name}" if holder_name else name
    if hasattr(holder, name):
        raise ValueError(
            f"cannot add {where}: it exists already (does the model have ARC adapters?)"
        )
    if isinstance(holder, CONTAINERS):
        raise ValueError(
            f"cannot add {where}: a {type(holder).__name__} would treat it as one of its layers"
        )


def _has_slot(block, position):
    """Whether `block`'s forward calls an adapter_<position> that is still empty (vit.py, swin.py)."""
    return isinstance(getattr(block, f"adapter_{position}", None), nn.Identity)


def _check_block(block, block_name, position, sites):
    """The block takes an adapter: into an empty slot, whose output goes where the block's forward sends it
    (its `adapter_feeds`, when it says, must be what targets names: else the fold would go elsewhere), or
    hooked onto layers that it can be folded into."""
    if _has_slot(block, position):
        feeds = _listed(getattr(block, "adapter_feeds", {}).get(position, []))
        named = [name[len(block_name) + 1 :] for _, _, name, _ in sites]
        if feeds and sorted(named) != sorted(feeds):
            raise ValueError(
                f"{block_name}.adapter_{position} is a slot whose output feeds {', '.join(feeds)}, not "
                f"{', '.join(named)}: targets[{position!r}] must name what it feeds (or leave targets out)"
            )
        return
    _check_free(block, block_name, f"adapter_{position}")
    for _, layer, name, parent in sites:
        _check_foldable(name, layer, parent)


def _attach(model, block, position, down_proj, sites, dropout):
    """One adapter for `block`: into its adapter_<position> slot, or hooked onto the modules it feeds. It takes
    W's device and dtype, and the model's mode (its dropout off in eval)."""
    layers = [layer for _, layer, _, _ in sites]
    slot = _has_slot(block, position)
    # in a slot, the block's forward calls it; it may feed a norm there (swin.py's residual option): not foldable
    foldable = not slot or all(
        isinstance(layer, (nn.Linear, nn.MultiheadAttention)) for layer in layers
    )
    adapter = ARCAdapter(
        down_proj, layers if foldable else None, dropout, identity_init=position == "att"
    )
    adapter.to(down_proj.weight.device, down_proj.weight.dtype).train(model.training)
    if slot:
        setattr(block, f"adapter_{position}", adapter)
        return
    block.add_module(f"adapter_{position}", adapter)
    adapter._sites = [layer_name for _, _, layer_name, _ in sites]
    adapter._handles = [
        hooked.register_forward_pre_hook(adapter._adapt_input, with_kwargs=True)
        for hooked, _, _, _ in sites
    ] + [model.register_forward_hook(adapter._check_called)]


@torch.no_grad()
def fold(adapter, layer):
    """Fold `adapter` into the nn.Linear (or nn.MultiheadAttention's q, k, v projection) it feeds, in place:
    Wt' = Wt M_l, beta' = beta + Wt b_l, computed in float64 as Wt + ((Wt W) diag(c_l)) W^T, which never
    forms the d x d matrix M_l."""
    weight, bias = _weight_and_bias(layer)
    full, down_proj = weight.double(), adapter.down_proj.double()
    bias.copy_(bias.double() + full @ adapter.bias.double())
    weight.copy_(full + ((full @ down_proj) * adapter.scale.double()) @ down_proj.T)


@torch.no_grad()
def reparameterize(model):
    """Fold every ARCAdapter into the layers it feeds, then remove adapters, hooks and shared projections.

    The model keeps its class, its modules and exactly its original state_dict() keys (it loads strict=True
    into the model built without ARC), and in eval mode its outputs are the adapted model's."""
    adapters = [
        (name, module) for name, module in model.named_modules() if isinstance(module, ARCAdapter)
    ]
    unfoldable = [name for name, adapter in adapters if adapter.feeds is None]
    if unfoldable:
        raise ValueError(
            f"{unfoldable[0]} ({len(unfoldable)} adapters) transforms the input of a norm, and with it "
            f"the residual stream (the official ARC Swin's FFN side): no weight can absorb it"
        )
    for name, adapter in adapters:
        for layer in adapter.feeds:
            fold(adapter, layer)
        for handle in adapter._handles:
            handle.remove()
        parent, _, attribute = name.rpartition(".")
        if adapter._handles:
            delattr(model.get_submodule(parent), attribute)
        else:  # a slot the block's forward calls
            setattr(model.get_submodule(parent), attribute, nn.Identity())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedProjection):
                delattr(parent, name)
    return model


def _head(model, head):
    """The name of the classifier head to train: `head`, or for "auto" the first of HEADS the model has."""
    names = {name for name, _ in model.named_modules()}
    if head == "auto":
        head = next((name for name in HEADS if name in names), None)
        if head is None:
            raise ValueError(
                f"{type(model).__name__} has no module named {', '.join(HEADS)}: pass head=<the name of "
                f"its classifier head>, or head=None to train the adapters alone"
            )
    elif head is not None and head not in names:
        raise ValueError(f"{type(model).__name__} has no module {head!r} to train as its head")
    return head


def arc_state_dict(model, head="auto"):
    """The tensors ARC trains: every adapter and shared W, and the classifier head (see mark_trainable)."""
    head = _head(model, head)
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if is_arc(module)) + (
        (f"{head}.",) if head is not None else ()
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def mark_trainable(model, head="auto"):
    """Freeze everything but the ARC tensors and the head; return the number of trainable parameters.
    head: the head module's name ("head" in timm and vit.py, "heads" in torchvision's ViT, "classifier" in
    transformers: "auto" finds these), or None for no head."""
    trainable = arc_state_dict(model, head).keys()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_arc_state_dict(model, state_dict, head="auto"):
    """Load an arc_state_dict() into `model` (its frozen weights already loaded); names must match exactly."""
    expected = arc_state_dict(model, head)
    missing, unexpected = (
        sorted(expected.keys() - state_dict.keys()),
        sorted(state_dict.keys() - expected.keys()),
    )
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"adapter checkpoint does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shapes (file vs model) {wrong[:3]} (saved from another model, method or "
            f"rank?)"
        )
    model.load_state_dict(state_dict, strict=False)
    return model
