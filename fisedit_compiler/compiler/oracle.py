"""The reference semantics of an edit (docs/design.md, "Oracle"), computed densely.

``masked_dense`` runs the canonical graph densely twice: on the original inputs, keeping every
node's value, then on the edited inputs, replacing after every positional (spatial or tokens)
node its value outside the level's effective mask by the original run's value. Global and
opaque nodes are computed normally. Where the config picks an approximation, the oracle applies
the same one at sparse levels: ``cached`` group norm normalises with the original run's
statistics, ``sparse`` self-attention lets queries attend to active tokens only. Each op's
approximation is its registry entry's ``oracle`` (``passes.registry``), written densely beside
its sparse rewrite. Dense levels are exact, as in the engine.

It is slow and memory-hungry on purpose: it shares no code with the sparse ops it checks.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ir
from ..checks import check_inputs_dict
from ..errors import FiseditError
from ..execution.plan import MaskPlan
from ..graph_keys import INPUTS
from ..passes import registry
from ..passes.analyze import META_BY_SHAPE
from .pipeline import describe_signature_change


@torch.no_grad()
def masked_dense(engine, plan: MaskPlan, original_inputs: dict, edited_inputs: dict):
    """The oracle's edit output for ``edited_inputs`` against the generation ``original_inputs``.

    The arguments are checked as ``engine.edit`` checks its own, before either dense pass (each
    costs a U-Net call or more): a plan of the engine's levels, valid U-Net inputs, and edited
    inputs of the original's signature (names, shapes, dtypes), since the edited run replaces
    values of the original run position by position.
    """
    # The engine layer sits above this one: an engine is known by what the oracle calls.
    if not all(callable(getattr(engine, name, None))
               for name in ("_check_inputs", "signature", "flat", "program", "check_plan")):
        raise FiseditError(f"masked_dense needs the engine the plan was made with "
                           f"(fc.compile(unet), or a recording's rec.engine), got "
                           f"{type(engine).__name__}")
    if not isinstance(plan, MaskPlan):
        raise FiseditError(f"masked_dense needs plan=engine.plan(mask), a MaskPlan, got "
                           f"{type(plan).__name__}; make the plan of the mask with the engine")
    for name, inputs in (("original_inputs", original_inputs), ("edited_inputs", edited_inputs)):
        check_inputs_dict(f"masked_dense's {name}", inputs)
    engine._check_inputs(original_inputs)
    engine._check_inputs(edited_inputs)
    before, after = engine.signature(original_inputs), engine.signature(edited_inputs)
    if after != before:         # signatures list inputs in one order, whatever the caller's
        raise FiseditError(
            "the edited inputs do not match the original inputs: "
            f"{describe_signature_change(after, before, 'the original')}; an edit keeps the "
            "original's inputs, their shapes and dtypes, and changes only their values")
    program = engine.program(original_inputs)
    engine.check_plan(plan, program)
    gm = program.canonical
    names = gm.meta[INPUTS]
    original = _Recorder(gm).run_all(engine.flat(original_inputs), names)
    return _Masked(gm, plan, original, engine.config).run_all(
        engine.flat(edited_inputs), names)


class _Recorder(fx.Interpreter):
    def run_all(self, flat: dict, names: list[str]):
        self.values: dict[str, object] = {}
        self.run(*[flat[name] for name in names])
        return self.values

    def run_node(self, node):
        value = super().run_node(node)
        self.values[node.name] = value
        return value


class _Masked(fx.Interpreter):
    def __init__(self, gm, plan: MaskPlan, original: dict, config):
        super().__init__(gm)
        self.plan, self.original, self.config = plan, original, config

    def run_all(self, flat: dict, names: list[str]):
        return self.run(*[flat[name] for name in names])

    def run_node(self, node):
        domain = node.meta.get(ir.META_DOMAIN)
        sparse_level = (domain is not None and domain.positional
                        and not self.plan[domain.level].dense)
        # A node placed by its shape alone runs exactly (densely) in the edit, then restricted.
        approximated = sparse_level and not node.meta.get(META_BY_SHAPE)
        spec = registry.spec_of(node)
        value = None
        if approximated and spec is not None and spec.oracle is not None:
            value = spec.oracle(node, self.map_nodes_to_values(node.args, node), self.original,
                                self.plan[domain.level].active, self.config)
        if value is None:
            value = super().run_node(node)
        if sparse_level and isinstance(value, torch.Tensor):
            keep = _position_mask(self.plan[domain.level].active, domain, value.dim())
            value = torch.where(keep, value, self.original[node.name])
        return value


def _position_mask(active: torch.Tensor, domain, rank: int) -> torch.Tensor:
    """The level mask shaped to broadcast over a tensor whose positions lie on ``domain.dims``."""
    shape = [1] * rank
    if len(domain.dims) == 2:
        shape[domain.dims[0]], shape[domain.dims[1]] = active.shape
    else:
        shape[domain.dims[0]] = active.numel()
    return active.reshape(shape)
