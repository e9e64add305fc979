"""OpSpec: what one canonical op declares, and the vocabulary its rules are written in.

Why: every pass handles each op differently (how ATen spells it, where its positions go, how it
runs on compact tensors, what it records, what kernel runs it), and an op whose facts are spread
over eight modules is easy to add half of. An ``OpSpec`` holds all of one op's facts in one entry,
the passes look the entry up (``passes.registry``), and nothing else is keyed by op name
(docs/design.md, "Op registry"). torchao's config -> registered handler is the model.

This module sits below the registry's entries and the passes that read them, so that entries can
use the shared rules here (``Domain``, ``elementwise``, ``same_op``, ...) without an import cycle.

The objects a rule receives are built by its pass and are documented there; in short:

* ``canonicalize`` rules get ``(b, a)``: a builder (``b.emit(name, *args)``, ``b.get(value)``,
  ``b.shape(node)``, ``b.forward(value)``, ``b.source``, ``b.env``, ``b.graph``) and the ATen
  node's arguments by schema name (``aten_arguments``). A rule returns the canonical node, or
  None to keep the ATen op as it is (unknown).
* ``domain`` rules get the canonical node (its inputs already analyzed) and return a ``Domain``.
* ``sparse`` rewrites get ``(edit, node)``: the sparsify rewriter (``edit.emit(target, *args,
  source=node)``, ``edit.read(node, kind)``, ``edit.env``, ``edit.operand(value, node)``,
  ``edit.plan``, ``edit.config``) and the canonical node, and return the new node, or None to
  run the node dense on mixed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ... import ir


@dataclass(frozen=True)
class OpSpec:
    """One canonical op. Every facet from ``name`` to ``oracle`` is given by each entry (none
    has a default); the "none" of a facet is an explicit value with the meaning below, so an
    entry cannot forget one silently. ``meta`` and ``opaque_inputs`` refine analyze for the
    one op that needs them (attention) and default to nothing.

    name:       the op's name (``node.meta[ir.META_OP]``).
    fn:         the canonical function a node calls, with positional arguments in a documented
                order (its docstring, or ``ir``'s).
    kind:       its family: conv, norm, attention, linear, upsample, pointwise, cat, view,
                factory (for reading; no pass dispatches on it).
    aten:       {ATen op (or ``operator.getitem``): canonicalize rule} for the spellings that map
                onto this op. ``{}``: nothing captured becomes this op.
    domain:     the domain rule (where the output's positions are); None: the op has no
                positional input (factories), so its output is always global.
    macs:       ``macs(node) -> int``, the dense multiply-accumulates; None: it computes none
                worth counting (pointwise, views).
    edit_macs:  ``edit_macs(node, level, config, dense) -> float``, the MACs a sparse edit
                computes at a sparse ``level`` (a ``LevelPlan``); None: per position, ``dense``
                times the level's active fraction.
    sparse:     the sparse rewrite; None: positional nodes run dense on mixed inputs (exact,
                slower, with a warning).
    records:    {cache kind: ``record(graph, node, env, tiles) -> fx.Node``} for what the rewrite
                reads with ``edit.read(node, kind)`` besides a node's value (group norm: its
                statistics); the record graph writes that node's result. ``{}``: it reads
                values only, which need no declaration.
    reference:  the reference sparse ops (``execution.sparse_ops``) its rewrite, or a fusion of
                it, puts in the edit graph. ``()``: it emits the canonical function itself on
                compact tensors.
    lowerings:  {reference op: Triton-backed op (``execution.triton_ops``)}, swapped in by
                ``lower_kernels`` on CUDA. ``{}``: the reference runs on every device.
    oracle:     ``oracle(node, args, original, active, config) -> value | None``: the value of the
                approximation the config picks for this op at a sparse level (``args``: its
                argument values; ``original``: the original run's values by node name;
                ``active``: the level's effective mask), or None where the config is exact.
                None: the op has no approximate policy.
    meta:       ``meta(node) -> dict`` of further facts analyze stores on the node (attention:
                self or cross); None: none.
    opaque_inputs: whether the domain rule itself handles opaque inputs (attention: opaque K/V
                are computed densely, each query attends on its own). Otherwise any opaque
                input makes the output opaque.
    """

    name: str
    fn: Callable
    kind: str
    aten: dict
    domain: Callable | None
    macs: Callable | None
    edit_macs: Callable | None
    sparse: Callable | None
    records: dict
    reference: tuple
    lowerings: dict
    oracle: Callable | None
    meta: Callable | None = None
    opaque_inputs: bool = False


# -- domains ---------------------------------------------------------------------------------

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

    def compact_axis(self, axis: int) -> int:
        """Where dense ``axis`` of a positional tensor lands once its positions are one dim."""
        first, last = self.dims[0], self.dims[-1]
        if axis < first:
            return axis
        if axis <= last:
            return first
        return axis - (last - first)


GLOBAL = Domain("global")
OPAQUE = Domain("opaque")


def domain_of(value) -> Domain:
    """The domain of an analyzed node; constants are global."""
    if isinstance(value, fx.Node):
        return value.meta.get(ir.META_DOMAIN, GLOBAL)
    return GLOBAL


def shape_of(node) -> tuple[int, ...]:
    """The static shape of a node's value (``()`` for non-tensors and constants)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def aten_arguments(node: fx.Node) -> dict:
    """An ATen node's arguments by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {"args": node.args, **node.kwargs}
    named = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            named[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
        else:
            named[argument.name] = None
    return named


# -- rules shared by several families --------------------------------------------------------

def elementwise(node: fx.Node) -> Domain:
    """Domain of a broadcasting elementwise op: its positional operands' positions, aligned to
    the output's rank; opaque when two operands disagree."""
    out_shape = shape_of(node)
    found = None
    for value in node.all_input_nodes:
        domain = domain_of(value)
        if not domain.positional:
            continue
        offset = len(out_shape) - len(shape_of(value))
        aligned = Domain(domain.kind, tuple(d + offset for d in domain.dims), domain.size)
        if found is not None and found != aligned:
            return OPAQUE
        found = aligned
    if found is None:
        return OPAQUE
    return found


def image_output(node: fx.Node) -> Domain:
    """An op that makes a new image (conv, upsample): spatial at its output's size."""
    shape = shape_of(node)
    return Domain("spatial", (2, 3), (shape[2], shape[3])) if len(shape) == 4 else OPAQUE


def before_trailing(node: fx.Node, trailing: int) -> Domain:
    """Domain of an op over the last ``trailing`` dims of its input (linear: 1, layer_norm: its
    normalized shape): positions must lie before them."""
    domain = domain_of(node.args[0])
    rank = len(shape_of(node.args[0]))
    if domain.positional and max(domain.dims) < rank - trailing:
        return domain
    return OPAQUE


def same_op(edit, node: fx.Node):
    """Sparse rewrite of an elementwise op: the same op on compact operands (global operands
    collapsed or gathered)."""
    args = []
    for value in node.args:
        compact = edit.operand(value, node)
        if compact is None:
            return None
        args.append(compact)
    return edit.emit(node.target, *args, source=node)


def per_position(edit, node: fx.Node):
    """Sparse rewrite of an op on each position's channels (linear, layer_norm): the same op on
    the compact input."""
    x, *rest = node.args
    return edit.emit(node.target, edit.env[x], *fx.map_arg(tuple(rest), lambda n: edit.env[n]),
                     source=node)



def dim_index(dim: int, rank: int) -> int:
    """A possibly negative dim as an index in ``range(rank)``."""
    return dim + rank if dim < 0 else dim
