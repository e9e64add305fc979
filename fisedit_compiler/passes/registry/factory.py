"""Factories (arange, full): they take no tensor, so their values are always global (the time
embedding's frequencies, constant masks)."""

from __future__ import annotations

import torch

from ... import ir
from .spec import OpSpec

aten = torch.ops.aten


def _arange(b, a: dict):
    val = b.source.meta["val"]
    return b.emit("arange", a.get("start", 0), a["end"], a.get("step", 1) or 1, val.dtype,
                  a.get("device") or val.device)


def _full(b, a: dict):
    val = b.source.meta["val"]
    value = {aten.ones.default: 1.0, aten.zeros.default: 0.0}.get(b.source.target)
    if value is None:
        value = a["fill_value"]
    return b.emit("full", tuple(b.shape()), value, val.dtype, a.get("device") or val.device)


def _factory(name: str, fn, rule, aten_ops) -> OpSpec:
    return OpSpec(name=name, fn=fn, kind="factory", aten={op: rule for op in aten_ops},
                  domain=None, macs=None, edit_macs=None, sparse=None, records={},
                  reference=(), lowerings={}, oracle=None)


SPECS = [
    _factory("arange", ir.arange, _arange,
             (aten.arange.default, aten.arange.start, aten.arange.start_step)),
    _factory("full", ir.full, _full, (aten.ones.default, aten.zeros.default, aten.full.default)),
]
