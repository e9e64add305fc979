"""Pointwise ops: silu, gelu, cast, the unary math functions (relu and mish among them, two of
diffusers' activations) and the binary operators.

One family, one rule set: the output keeps its positional operands' positions (broadcasting
aligned), and the sparse form is the same op on compact operands, global operands collapsed or
gathered. gelu also names the GEGLU that ``fuse_tokens`` makes of a split, a gelu and a mul.
"""

from __future__ import annotations

import dataclasses

import torch

from ... import ir
from ...execution import sparse_ops, triton_ops
from .spec import OpSpec, elementwise, same_op

aten = torch.ops.aten


def _pointwise(name: str, fn, aten_rules: dict, **facets) -> OpSpec:
    """The entry of a pointwise op; ``facets`` override the family's."""
    spec = OpSpec(name=name, fn=fn, kind="pointwise", aten=aten_rules, domain=elementwise,
                  macs=None, edit_macs=None, sparse=same_op, records={}, reference=(),
                  lowerings={}, oracle=None)
    return dataclasses.replace(spec, **facets)


def _is_scalar(value, number: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == number


def _binary(name: str):
    def rule(b, a: dict):
        lhs, rhs = a["self"], a["other"]
        if name == "div" and a.get("rounding_mode") is not None:
            return None
        # x / 1.0 is x only when no type promotion happens (an integer x gives a float).
        if (name in ("div", "mul") and _is_scalar(rhs, 1.0)
                and lhs.meta["val"].dtype == b.source.meta["val"].dtype):
            return b.forward(lhs)
        if name in ("add", "sub") and not _is_scalar(a.get("alpha", 1), 1):
            rhs = b.emit("mul", b.get(rhs), a["alpha"])
            return b.emit(name, b.get(lhs), rhs)
        return b.emit(name, b.get(lhs), b.get(rhs))
    return rule


def _unary(name: str):
    return lambda b, a: b.emit(name, b.get(a["self"]))


def _cast(b, a: dict):
    source = a["self"]
    dtype = a.get("dtype")
    if dtype is None or source.meta["val"].dtype == dtype:
        return b.forward(source)
    return b.emit("cast", b.get(source), dtype)


_UNARY = {"neg": ir.neg, "exp": ir.exp, "sin": ir.sin, "cos": ir.cos, "sigmoid": ir.sigmoid,
          "tanh": ir.tanh, "sqrt": ir.sqrt, "rsqrt": ir.rsqrt, "relu": ir.relu, "mish": ir.mish}

SPECS = [
    _pointwise("silu", ir.silu, {aten.silu.default: _unary("silu")}),
    _pointwise("gelu", ir.gelu,
               {aten.gelu.default: lambda b, a: b.emit("gelu", b.get(a["self"]),
                                                       a["approximate"])},
               reference=(sparse_ops.geglu,),            # GEGLU (fuse_tokens)
               lowerings={sparse_ops.geglu: triton_ops.geglu}),
    _pointwise("cast", ir.cast, {aten.to.dtype: _cast, aten._to_copy.default: _cast,
                                 aten.to.dtype_layout: _cast}),
    *[_pointwise(name, fn, {getattr(aten, name).default: _unary(name)})
      for name, fn in _UNARY.items()],
    _pointwise("add", ir.add, {aten.add.Tensor: _binary("add"), aten.add.Scalar: _binary("add")}),
    _pointwise("sub", ir.sub, {aten.sub.Tensor: _binary("sub"), aten.sub.Scalar: _binary("sub")}),
    _pointwise("mul", ir.mul, {aten.mul.Tensor: _binary("mul"), aten.mul.Scalar: _binary("mul")}),
    _pointwise("div", ir.div, {aten.div.Tensor: _binary("div"), aten.div.Scalar: _binary("div"),
                               aten.div.Tensor_mode: _binary("div")}),
    _pointwise("pow", ir.pow, {aten.pow.Tensor_Scalar: lambda b, a: b.emit(
        "pow", b.get(a["self"]), a["exponent"])}),
]
