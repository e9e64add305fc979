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
average pooling, a reflect pad's conv, the FIR resampling of score-SDE; real-valued, since a
complex one is a spectrum) is not left opaque but taken as spatial at that size, and tagged
``META_BY_SHAPE``. The edit then computes it densely from mixed inputs *and restricts it to
the region* like any positional value, so what follows it is sparse again, and the background
stays the recording's on every model. Opaque values that never take a spatial shape again can
only reach the output through one that does, and the U-Net output always does
(``passes.sparsify`` refuses a graph whose output shows no positions).

Levels are numbered from the finest resolution (level 0, the latent) downwards. The domain
rules and MAC counts are the ops' own (``OpSpec.domain``, ``OpSpec.macs`` in
``passes.registry``); this pass drives them.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from .. import ir
from ..graph_keys import LEVELS
from . import registry
from .registry.spec import GLOBAL, OPAQUE, Domain, domain_of, shape_of


# On a node the rules could not follow whose domain was read off its shape (see the docstring):
# the edit computes it densely, and the oracle exactly, before restricting it to the region.
META_BY_SHAPE = "fc_by_shape"

SAMPLE_INPUT = "sample"
TIMESTEP_INPUT = "timestep"


def analyze(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate ``gm`` in place (META_DOMAIN, META_MODULE, META_MACS, META_INVARIANT,
    META_DEPENDS, and what an op's entry adds, ``OpSpec.meta``: META_ATTN_KIND on attention)
    and record ``gm.meta["fc_levels"]``, the (H, W)
    of each level. Returns ``gm``."""
    sizes = set()
    spatial_shapes = _spatial_shapes(gm)
    for node in gm.graph.nodes:
        node.meta[ir.META_MODULE] = module_path(node)
        node.meta[ir.META_DEPENDS] = _depends(node)
        node.meta[ir.META_INVARIANT] = _invariant(node.meta[ir.META_DEPENDS])
        domain = _domain(node)
        shape = shape_of(node)
        if domain.kind == "opaque" and len(shape) == 4 and not _complex(node) and (
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
        spec = registry.spec_of(node)
        if spec is not None and spec.meta is not None:
            node.meta.update(spec.meta(node))
    gm.meta[LEVELS] = levels
    return gm


def _complex(node: fx.Node) -> bool:
    """Whether ``node`` holds complex values: a spectrum (FreeU's Fourier filter, ``fftn`` of
    a feature map), whose ``[B, C, H, W]`` indexes frequencies, not positions. Taken as
    spatial, it was restricted to the region frequency by frequency and its inverse transform
    mixed new and recorded frequencies; left opaque, the filter runs densely up to its real
    output, which has positions again."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_complex()


def _spatial_shapes(gm: fx.GraphModule) -> set[tuple[int, int, int]]:
    """(batch, H, W) of the spatial values a U-Net can hold: the sample's batch, and the sizes
    of its resolution pyramid (each side halved, rounded either way, down to 1)."""
    sample = next((n for n in gm.graph.nodes if n.op == "placeholder"
                   and n.name == SAMPLE_INPUT and len(shape_of(n)) == 4), None)
    if sample is None:
        return set()
    batch, _, height, width = shape_of(sample)
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


def _domain(node: fx.Node) -> Domain:
    if node.op == "placeholder":
        shape = shape_of(node)
        if node.name == SAMPLE_INPUT and len(shape) == 4:
            return Domain("spatial", (2, 3), (shape[2], shape[3]))
        return GLOBAL
    if node.op != "call_function":
        return GLOBAL
    sources = [domain_of(n) for n in _inputs(node)]
    if not any(d.kind != "global" for d in sources):
        return GLOBAL
    spec = registry.spec_of(node)
    if spec is None or spec.domain is None:
        return OPAQUE
    if any(d.kind == "opaque" for d in sources) and not spec.opaque_inputs:
        return OPAQUE
    return spec.domain(node)


def macs(node: fx.Node) -> int:
    """Dense multiply-accumulates of a canonical node (its op's ``OpSpec.macs``; 0 for ops that
    compute none worth counting)."""
    spec = registry.spec_of(node)
    return spec.macs(node) if spec is not None and spec.macs is not None else 0
