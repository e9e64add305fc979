"""The op registry (docs/design.md, "Op registry"): complete, and an op is one entry.

Every canonical op declares every facet (an explicit value, None or empty where it has none, with
the meaning ``OpSpec`` documents); every reference sparse op and every Triton launcher belongs
to an op; and a toy op registered in a test runs sparse through the whole compiler on CPU and
meets the oracle, with nothing else edited.
"""

import dataclasses
import inspect
import operator

import pytest
import torch

from fisedit_compiler import ir, zoo
from fisedit_compiler.execution import sparse_ops, triton_ops
from fisedit_compiler.passes import registry
from fisedit_compiler.passes.registry.spec import OpSpec, elementwise, same_op
from pass_checks import box_edit

aten = torch.ops.aten

FACETS = ("name", "fn", "kind", "aten", "domain", "macs", "edit_macs", "sparse", "records",
          "reference", "lowerings", "oracle")
KINDS = {"conv", "norm", "attention", "linear", "upsample", "pointwise", "cat", "view",
         "factory"}
# sparse_ops functions that belong to the edit graph's machinery, not to one op: cache access,
# moving between compact and dense, and what the record graph computes for an op's records.
MACHINERY = {sparse_ops.cache_read, sparse_ops.cache_shift, sparse_ops.cache_write,
             sparse_ops.gather_positions, sparse_ops.scatter_full, sparse_ops.group_norm_stats}
SPECS = list(registry.REGISTRY.values())


def public_functions(module) -> set:
    return {value for name, value in vars(module).items() if inspect.isfunction(value)
            and value.__module__ == module.__name__ and not name.startswith("_")}


def test_every_facet_must_be_given():
    """No facet has a default, so an entry cannot leave one out by forgetting it."""
    required = [f.name for f in dataclasses.fields(OpSpec) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    assert tuple(required) == FACETS


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_every_op_declares_every_facet(spec):
    assert registry.REGISTRY[spec.name] is spec and callable(spec.fn) and spec.kind in KINDS
    assert spec.aten and all(callable(rule) for rule in spec.aten.values())
    assert all(isinstance(op, torch._ops.OpOverload) or op is operator.getitem
               for op in spec.aten)
    # Every op that can take a positional input follows its positions and has a sparse form;
    # only factories (no tensor input) have neither.
    assert (spec.domain is None) == (spec.sparse is None) == (spec.kind == "factory")
    for facet in ("macs", "edit_macs", "oracle", "meta"):
        assert getattr(spec, facet) is None or callable(getattr(spec, facet))
    assert spec.edit_macs is None or spec.macs is not None     # sparse MACs scale dense ones
    assert all(isinstance(kind, str) and kind != "value" and callable(record)
               for kind, record in spec.records.items())
    assert isinstance(spec.reference, tuple)
    assert all(op in public_functions(sparse_ops) for op in spec.reference)
    for op, lowered in spec.lowerings.items():
        assert op in spec.reference or op is spec.fn
        assert lowered in public_functions(triton_ops) and lowered.__name__ == op.__name__
        assert list(inspect.signature(lowered).parameters)[:len(
            inspect.signature(op).parameters)] == list(inspect.signature(op).parameters)


def test_every_sparse_op_and_launcher_belongs_to_one_op():
    references = [op for spec in SPECS for op in spec.reference]
    assert len(references) == len(set(references))
    assert public_functions(sparse_ops) == set(references) | MACHINERY
    lowered = [op for spec in SPECS for op in spec.lowerings.values()]
    assert len(lowered) == len(set(lowered))
    assert public_functions(triton_ops) == set(lowered)
    assert registry.lowerings() == {op: new for spec in SPECS
                                    for op, new in spec.lowerings.items()}


def test_canonical_functions_are_distinct_and_registration_guards_its_keys():
    functions = [spec.fn for spec in SPECS]
    assert len(functions) == len(set(functions))
    conv = registry.REGISTRY["conv2d"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(conv)
    with pytest.raises(ValueError, match="already canonicalized"):
        registry.register(dataclasses.replace(conv, name="another_conv"))
    assert registry.REGISTRY["conv2d"] is conv and "another_conv" not in registry.REGISTRY


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny"])
def test_every_op_a_unet_canonicalizes_to_is_registered(traced, name):
    gm = traced(name).gm
    for node in gm.graph.nodes:
        if node.op == "call_function" and not node.meta.get(ir.META_UNKNOWN):
            assert registry.spec_of(node).fn is node.target, node.name


# The whole of a new op: its canonical function, its ATen spelling and the shared pointwise
# rules (domain: follow the operands' positions; sparse: the same op on compact tensors).
ABS = OpSpec(name="abs", fn=torch.abs, kind="pointwise",
             aten={aten.abs.default: lambda b, a: b.emit("abs", b.get(a["self"]))},
             domain=elementwise, macs=None, edit_macs=None, sparse=same_op, records={},
             reference=(), lowerings={}, oracle=None)


def edit_through_the_engine(unet):
    """Record, edit a box and compare with the oracle; returns (program, error, warnings)."""
    run = box_edit(unet, slice(2, 6), slice(9, 13))
    return run.engine.program(run.inputs), run.error, [str(w.message) for w in run.caught]


def test_a_new_op_is_one_entry():
    unet = zoo.unet("sd15-tiny")
    unet.conv_in.register_forward_hook(lambda module, args, out: out + 0.1 * torch.abs(out))
    before, error, caught = edit_through_the_engine(unet)       # unknown: runs dense
    assert "aten.abs.default" in before.canonical.meta["fc_unknown_ops"] and error <= 1e-5
    assert any("run dense" in message for message in caught)
    registry.register(ABS)
    try:
        after, error, caught = edit_through_the_engine(unet)
    finally:
        registry.unregister("abs")
    assert error <= 1e-5 and not any("run dense" in message for message in caught)
    nodes = [n for n in after.canonical.graph.nodes if ir.is_op(n, "abs")]
    assert len(nodes) == 1 and nodes[0].target is torch.abs
    assert nodes[0].meta[ir.META_DOMAIN].positional and after.modes[nodes[0].name] == "sparse"
    assert not after.canonical.meta["fc_unknown_ops"]
    assert "abs" not in registry.REGISTRY and registry.aten_rule(aten.abs.default) is None
