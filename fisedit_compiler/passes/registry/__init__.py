"""The op registry: one ``OpSpec`` per canonical op, holding all of that op's facts.

Why: adding an op used to mean editing eight modules keyed by strings (docs/design.md, "Op
registry"). Here each family's file (``conv``, ``norm``, ``attention``, ``linear``,
``upsample``, ``pointwise``, ``cat``, ``views``, ``factory``) declares its ops' entries in
``SPECS``: canonical function and kind, ATen rules, domain rule, MACs, sparse rewrite, cache
needs, reference sparse ops, kernel lowerings and oracle policy (``spec.OpSpec``). The passes,
the oracle and the engine look entries up here and hold no per-op table of their own.

The registry lives at the passes layer because its entries name sparse rewrites; the facts of
the execution layer (reference ops, Triton launchers) are referenced from the entries, which
may import downward. ``register`` and ``unregister`` are public so that a test can add a toy op
for its duration (tests/test_registry.py); the compiler reads the registry when it runs.
"""

from __future__ import annotations

from ... import ir
from . import attention, cat, conv, factory, linear, norm, pointwise, upsample, views
from .spec import OpSpec

REGISTRY: dict[str, OpSpec] = {}
_ATEN: dict = {}        # ATen op -> the name of the op whose entry canonicalizes it


def register(spec: OpSpec) -> None:
    """Add ``spec``; an op name or ATen op that another entry already has is refused."""
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} is already registered")
    taken = [str(op) for op in spec.aten if op in _ATEN]
    if taken:
        raise ValueError(f"op {spec.name!r}: {taken} already canonicalized by another op")
    REGISTRY[spec.name] = spec
    _ATEN.update((op, spec.name) for op in spec.aten)


def unregister(name: str) -> OpSpec:
    """Remove the op ``name`` and its ATen rules; returns its entry."""
    spec = REGISTRY.pop(name)
    for op in spec.aten:
        del _ATEN[op]
    return spec


def spec_of(node) -> OpSpec | None:
    """The entry of a canonical node's op (None for placeholders, outputs and unknown ops)."""
    name = ir.op_name(node)
    return REGISTRY.get(name) if name is not None else None


def aten_rule(target):
    """The canonicalize rule for an ATen op, or None when no op claims it."""
    name = _ATEN.get(target)
    return REGISTRY[name].aten[target] if name is not None else None


def lowerings() -> dict:
    """{reference op: Triton-backed op} over every entry (``passes.lower_kernels``)."""
    return {op: lowered for spec in REGISTRY.values() for op, lowered in spec.lowerings.items()}


def edit_macs(node, level, config, dense: float) -> float:
    """The MACs a sparse edit computes for ``node`` at a sparse ``level`` (a ``LevelPlan``)
    whose dense MACs are ``dense``: the op's ``edit_macs``, per position by default."""
    spec = spec_of(node)
    if spec is not None and spec.edit_macs is not None:
        return spec.edit_macs(node, level, config, dense)
    return dense * (level.count / (level.size[0] * level.size[1]))


for _family in (conv, norm, attention, linear, upsample, pointwise, cat, views, factory):
    for _spec in _family.SPECS:
        register(_spec)
