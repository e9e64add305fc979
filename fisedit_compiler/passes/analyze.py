"""analyze: annotate every canonical node with its domain, module path, MACs and invariance.

Why: the sparse passes must know, for each value, where its spatial positions are. A U-Net
tensor moves between layouts (``[B, C, H, W]`` for convolutions, ``[B, H*W, C]`` for
transformer tokens, ``[B, heads, H*W, d]`` inside attention) through reshapes and permutes; the
domain records which dimensions hold the positions so the rewrite can compact them. It also
separates what depends on the sample (spatial) from what does not (global: the timestep chain,
text K/V), which the engine computes once per step or once per prompt.

Domains (``Domain.kind``):

* ``spatial``: positions in two dimensions (H, W) at a U-Net level;
* ``tokens``: positions flattened into one dimension (H*W) at a level;
* ``global``: does not depend on the sample;
* ``opaque``: depends on the sample, but its positions cannot be followed (a reduction over
  positions, an op outside the canonical set, a reshape that mixes positions with channels).
  The engine computes such nodes densely from the mixed input.

The safety rule: a value the rules cannot follow whose shape shows it is spatial (``[B, C, H,
W]`` with the sample's batch and an (H, W) of the sample's resolution pyramid: the output of an
average pooling, a reflect pad's conv, the FIR resampling of score-SDE) is not left opaque but
taken as spatial at that size, and tagged ``META_BY_SHAPE``. The edit then computes it densely
from mixed inputs *and restricts it to the region* like any positional value, so what follows it
is sparse again, and the background stays the recording's on every model. Opaque values that
never take a spatial shape again can only reach the output through one that does, and the U-Net
output always does (``passes.sparsify`` refuses a graph whose output shows no positions).

Levels are numbered from the finest resolution (level 0, the latent) downwards.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import ir
from ..graph_keys import LEVELS


@dataclass(frozen=True)
class Domain:
    kind: str                          # "spatial", "tokens", "global" or "opaque"
    dims: tuple[int, ...] = ()         # tensor dimensions that hold the positions
    size: tuple[int, int] | None = None  # (H, W) of the level
    level: int | None = None

    @property
    def positional(self) -> bool:
        """True when the value's positions are known (spatial or tokens)."""
        return self.kind in ("spatial", "tokens")

    def describe(self) -> str:
        if self.positional:
            return f"{self.kind}@L{self.level}"
        return self.kind


GLOBAL = Domain("global")
OPAQUE = Domain("opaque")

# On a node the rules could not follow whose domain was read off its shape (see the docstring):
# the edit computes it densely, and the oracle exactly, before restricting it to the region.
META_BY_SHAPE = "fc_by_shape"

SAMPLE_INPUT = "sample"
TIMESTEP_INPUT = "timestep"


def analyze(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate ``gm`` in place (META_DOMAIN, META_MODULE, META_MACS, META_INVARIANT,
    META_DEPENDS, META_ATTN_KIND on attention) and record ``gm.meta["fc_levels"]``, the (H, W)
    of each level. Returns ``gm``."""
    sizes = set()
    spatial_shapes = _spatial_shapes(gm)
    for node in gm.graph.nodes:
        node.meta[ir.META_MODULE] = module_path(node)
        node.meta[ir.META_DEPENDS] = _depends(node)
        node.meta[ir.META_INVARIANT] = _invariant(node.meta[ir.META_DEPENDS])
        domain = _domain(node)
        shape = _shape(node)
        if domain.kind == "opaque" and len(shape) == 4 and (
                shape[0], shape[2], shape[3]) in spatial_shapes:
            domain = Domain("spatial", (2, 3), shape[2:])
            node.meta[META_BY_SHAPE] = True
        node.meta[ir.META_DOMAIN] = domain
        if domain.positional:
            sizes.add(domain.size)
        node.meta[ir.META_MACS] = macs(node)
    levels = sorted(sizes, key=lambda s: (-s[0] * s[1], s))
    index = {size: level for level, size in enumerate(levels)}
    for node in gm.graph.nodes:
        domain = node.meta[ir.META_DOMAIN]
        if domain.positional:
            node.meta[ir.META_DOMAIN] = Domain(domain.kind, domain.dims, domain.size,
                                               index[domain.size])
        if ir.is_op(node, "attention"):
            node.meta[ir.META_ATTN_KIND] = (
                "self" if node.args[1].meta[ir.META_DOMAIN].positional else "cross")
    gm.meta[LEVELS] = levels
    return gm


def _spatial_shapes(gm: fx.GraphModule) -> set[tuple[int, int, int]]:
    """(batch, H, W) of the spatial values a U-Net can hold: the sample's batch, and the sizes
    of its resolution pyramid (each side halved, rounded either way, down to 1)."""
    sample = next((n for n in gm.graph.nodes if n.op == "placeholder"
                   and n.name == SAMPLE_INPUT and len(_shape(n)) == 4), None)
    if sample is None:
        return set()
    batch, _, height, width = _shape(sample)
    found, sizes = set(), {(height, width)}
    while sizes:
        found |= sizes
        sizes = {(half_h, half_w) for h, w in sizes
                 for half_h in _halves(h) for half_w in _halves(w)} - found
    return {(batch, h, w) for h, w in found}


def _halves(n: int) -> set[int]:
    """``n`` halved, rounded down and up (a padded or unpadded stride-2 op), never below 1."""
    return {max(n // 2, 1), -(-n // 2)}


_MODULE_KEY = re.compile(r"\.?__dict__\['_modules'\]\['([^']+)'\]")


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.replace("L['self']", "")
    path = _MODULE_KEY.sub(lambda m: "." + m.group(1), path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _depends(node: fx.Node) -> frozenset:
    if node.op == "placeholder":
        return frozenset([node.name])
    deps = frozenset()
    for source in _inputs(node):
        deps |= source.meta[ir.META_DEPENDS]
    return deps


def _invariant(deps: frozenset) -> str | None:
    """How often a value changes: None (with the sample), "step" (once per step and prompt),
    "prompt" (once per prompt: text K/V), "constant" (never)."""
    if SAMPLE_INPUT in deps:
        return None
    if not deps:
        return "constant"
    if TIMESTEP_INPUT in deps:
        return "step"
    return "prompt"


def _shape(node) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _domain_of(value) -> Domain:
    if isinstance(value, fx.Node):
        return value.meta.get(ir.META_DOMAIN, GLOBAL)
    return GLOBAL


def _domain(node: fx.Node) -> Domain:
    if node.op == "placeholder":
        shape = _shape(node)
        if node.name == SAMPLE_INPUT and len(shape) == 4:
            return Domain("spatial", (2, 3), (shape[2], shape[3]))
        return GLOBAL
    if node.op != "call_function":
        return GLOBAL
    sources = [_domain_of(n) for n in _inputs(node)]
    if not any(d.kind != "global" for d in sources):
        return GLOBAL
    if any(d.kind == "opaque" for d in sources) and not ir.is_op(node, "attention"):
        return OPAQUE
    name = ir.op_name(node)
    rule = _RULES.get(ir.KIND.get(name), None) if name else None
    rule = _RULES.get(name, rule)
    return rule(node) if rule else OPAQUE


def _same_as_first(node: fx.Node) -> Domain:
    return _domain_of(node.args[0])


def _image_output(node: fx.Node) -> Domain:
    shape = _shape(node)
    return Domain("spatial", (2, 3), (shape[2], shape[3])) if len(shape) == 4 else OPAQUE


def _channel_op(node: fx.Node) -> Domain:
    """group_norm: positions must lie after the channel dimension."""
    domain = _domain_of(node.args[0])
    return domain if domain.positional and min(domain.dims) >= 2 else OPAQUE


def _last_dim_op(node: fx.Node) -> Domain:
    """linear and layer_norm act on trailing dimensions: positions must lie before them."""
    domain = _domain_of(node.args[0])
    rank = len(_shape(node.args[0]))
    trailing = 1 if ir.is_op(node, "linear") else len(node.args[1])
    if domain.positional and max(domain.dims) < rank - trailing:
        return domain
    return OPAQUE


def _pointwise(node: fx.Node) -> Domain:
    out_shape = _shape(node)
    found = None
    for value in node.all_input_nodes:
        domain = _domain_of(value)
        if not domain.positional:
            continue
        offset = len(out_shape) - len(_shape(value))
        aligned = Domain(domain.kind, tuple(d + offset for d in domain.dims), domain.size)
        if found is not None and found != aligned:
            return OPAQUE
        found = aligned
    if found is None:
        return OPAQUE
    return found


def _cat(node: fx.Node) -> Domain:
    domain = _pointwise(node)
    return OPAQUE if domain.positional and node.args[1] in domain.dims else domain


def _attention(node: fx.Node) -> Domain:
    """Each query attends on its own: positional queries keep their positions, whether K/V
    are the level's tokens (self), global (text) or opaque: computed densely, like the
    text-and-image K/V that IF's and Kandinsky's added-KV attention concatenates."""
    query, key = _domain_of(node.args[0]), _domain_of(node.args[1])
    if not query.positional or query.dims != (len(_shape(node.args[0])) - 2,):
        return OPAQUE
    if key.positional and key.size != query.size:
        return OPAQUE
    if node.args[3] is not None and _domain_of(node.args[3]).kind != "global":
        return OPAQUE
    return query


def _permute(node: fx.Node) -> Domain:
    domain = _domain_of(node.args[0])
    order = list(node.args[1])
    dims = tuple(order.index(d) for d in domain.dims)
    if list(dims) != list(range(dims[0], dims[0] + len(dims))):
        return OPAQUE  # positions reordered (W before H) or split apart
    return Domain(domain.kind, dims, domain.size)


def _reshape(node: fx.Node) -> Domain:
    domain = _domain_of(node.args[0])
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    first, last = domain.dims[0], domain.dims[-1]
    prefix = math.prod(in_shape[:first])
    block = math.prod(in_shape[first:last + 1])
    start = 0
    while math.prod(out_shape[:start]) < prefix or (
            start < len(out_shape) and out_shape[start] == 1 and block != 1):
        start += 1
    if math.prod(out_shape[:start]) != prefix:
        return OPAQUE
    end = start
    while end < len(out_shape) and math.prod(out_shape[start:end + 1]) < block:
        end += 1
    if end >= len(out_shape) or math.prod(out_shape[start:end + 1]) != block:
        return OPAQUE
    height, width = domain.size
    dims = tuple(range(start, end + 1))
    if len(dims) == 1:
        return Domain("tokens", dims, domain.size)
    if tuple(out_shape[start:end + 1]) == (height, width):
        return Domain("spatial", dims, domain.size)
    return OPAQUE


def _expand(node: fx.Node) -> Domain:
    domain = _domain_of(node.args[0])
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    offset = len(out_shape) - len(in_shape)
    dims = tuple(d + offset for d in domain.dims)
    if all(out_shape[d] == in_shape[d - offset] for d in dims):
        return Domain(domain.kind, dims, domain.size)
    return OPAQUE


def _along_other_dim(node: fx.Node) -> Domain:
    """slice and split: fine as long as they cut along a non-position dimension."""
    domain = _domain_of(node.args[0])
    dim = node.args[1] if ir.is_op(node, "slice") else node.args[2]
    return OPAQUE if dim in domain.dims else domain


_RULES = {
    "conv": _image_output,
    "upsample": _image_output,
    "pointwise": _pointwise,
    "cat": _cat,
    "attention": _attention,
    "linear": _last_dim_op,
    "layer_norm": _last_dim_op,
    "group_norm": _channel_op,
    "reshape": _reshape,
    "permute": _permute,
    "expand": _expand,
    "slice": _along_other_dim,
    "split": _along_other_dim,
    "getitem": _same_as_first,
}


def macs(node: fx.Node) -> int:
    """Dense multiply-accumulates of a canonical node (convolutions, linears, attention)."""
    name = ir.op_name(node)
    if name == "conv2d":
        weight = _shape(node.args[1])
        return math.prod(_shape(node)) * math.prod(weight[1:])
    if name == "linear":
        return math.prod(_shape(node)) * _shape(node.args[1])[1]
    if name == "attention":
        query, key, value = (_shape(a) for a in node.args[:3])
        return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])
    return 0
