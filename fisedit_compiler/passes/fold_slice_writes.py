"""fold_slice_writes: a buffer written slice by slice becomes a cat of the written values
and the slices left as they were.

Why: ``buffer[a:b] = value`` (and ``buffer[a:b] *= s``) reaches the captured graph
functionalised: per write a ``slice_scatter`` of the buffer so far with the value (or a
``copy`` of it into the slice). Neither op has a canonical form, so everything downstream ran
dense: diffusers' ``SlicedAttnProcessor`` (``set_attention_slice``,
``pipe.enable_attention_slicing()``) fills a buffer with the heads' attention outputs slice by
slice (measured on sd15-tiny: 606 nodes, a sixth of the MACs of a small edit), and FreeU
scales half of the channels in place. The result is the written values with the buffer's
own values between them, joined along the written dim: ``cat`` of values and slices, which
the edit runs on compact tensors (along channels or heads, never positions: cat refuses
those).

Taken only where that is exact: every write along one dim with step 1, the writes' ranges
non-overlapping, each value of the slice's shape and the buffer's dtype, and the
intermediate buffers read by nothing but the chain (a read of a half-written buffer would
see the state between writes).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ir
from ..graph_keys import UNKNOWN_OPS
from .canonicalize import canonical_call, unknown_ops
from .registry.spec import aten_arguments

aten = torch.ops.aten


def fold_slice_writes(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every complete chain in place and return ``gm`` (see the module docstring)."""
    graph = gm.graph
    folded = False
    for node in list(graph.nodes):
        if _is_scatter(node) and not any(_is_scatter(user) and aten_arguments(user)["self"]
                                         is node for user in node.users):
            folded |= _fold(graph, node)      # the last write of a chain
    if folded:
        graph.lint()
        gm.recompile()
        gm.meta[UNKNOWN_OPS] = unknown_ops(gm)
    return gm


def _is_scatter(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is aten.slice_scatter.default)


def _shape_dtype(node):
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None


def _written_value(buffer: fx.Node, src, dim: int, start: int, end: int):
    """The value a write puts into ``buffer[start:end]`` along ``dim``: ``src`` itself, or what
    a ``copy`` of a value into that very slice holds; None where it is not plainly that."""
    if isinstance(src, fx.Node) and src.target is aten.copy.default and len(src.users) == 1:
        copy_args = aten_arguments(src)
        target, value = copy_args["self"], copy_args["src"]
        if not (ir.is_call(target, ir.slice_dim) and target.args[0] is buffer
                and tuple(target.args[1:]) == (dim, start, end, 1)):
            return None
        return value if _shape_dtype(value) == _shape_dtype(target) else None
    return src


def _fold(graph: fx.Graph, last: fx.Node) -> bool:
    shape, dtype = _shape_dtype(last) or (None, None)
    if shape is None:
        return False
    writes, node, chain_dim = [], last, None     # (start, end, value, scatter), last first
    while _is_scatter(node):
        a = aten_arguments(node)
        dim = a["dim"] % len(shape)
        if not all(isinstance(v, (int, type(None))) for v in (a["start"], a["end"], a["step"])):
            return False               # symbolic bounds
        # Python's slice semantics (negative and past-the-end bounds), as canonicalize takes
        # the copy's target slice.
        start, end, step = slice(a["start"], a["end"], a["step"]).indices(shape[dim])
        if step != 1 or start >= end or chain_dim not in (None, dim):
            return False
        chain_dim = dim
        value = _written_value(a["self"], a["src"], dim, start, end)
        expected = shape[:dim] + (end - start,) + shape[dim + 1:]
        if value is None or _shape_dtype(value) != (expected, dtype):
            return False
        writes.append((start, end, value, node))
        buffer = a["self"]
        # An intermediate buffer read elsewhere would show the half-filled state.
        if _is_scatter(buffer) and any(user is not node and not _reads_only_for(user, node)
                                       for user in buffer.users):
            return False
        node = buffer
    dim, base = chain_dim, node
    ordered = sorted(writes, key=lambda w: w[0])
    if any(before[1] > after[0] for before, after in zip(ordered, ordered[1:])):
        return False                   # overlapping writes: the later one wins, in order
    if _shape_dtype(base) != (shape, dtype):
        return False
    source = "aten.slice_scatter.default (a buffer written slice by slice)"
    pieces, done = [], 0
    with graph.inserting_before(last):
        for start, end, value, _ in ordered + [(shape[dim], shape[dim], None, None)]:
            if done < start:           # not written: the buffer's own values
                kept = canonical_call(graph, "slice", (base, dim, done, start, 1), last.meta,
                                      source)
                kept.meta["val"] = base.meta["val"].narrow(dim, done, start - done)
                pieces.append(kept)
            if value is not None:
                pieces.append(value)
            done = end
        joined = canonical_call(graph, "cat", (pieces, dim), last.meta, source)
    last.replace_all_uses_with(joined)
    # The chain, last write first: each write, then its copy and slice, then the buffer.
    for _, _, _, scatter in writes:
        src = aten_arguments(scatter)["src"]
        for dead in (scatter, src, aten_arguments(src)["self"] if src.target is aten.copy.default
                     else None):
            if isinstance(dead, fx.Node) and not dead.users:
                graph.erase_node(dead)
    if not base.users and base.op == "call_function":
        graph.erase_node(base)
    return True


def _reads_only_for(user: fx.Node, scatter: fx.Node) -> bool:
    """Whether ``user`` is the slice a write's ``copy`` targets (read for its shape only)."""
    return ir.is_call(user, ir.slice_dim) and all(
        reader.target is aten.copy.default and all(r is scatter for r in reader.users)
        for reader in user.users)
