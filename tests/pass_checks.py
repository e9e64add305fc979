"""Helpers for the pass tests: every pass's result is a valid graph, and its input is untouched.

``linted(pass_fn, gm, *args)`` runs a pass, checks its result with ``graph.lint()`` (each node
defined before use, targets resolvable, one output) and returns it. ``edit_outputs`` runs edit
graphs (a pass's input and its result) on one recorded step, to compare what they compute;
``box_edit`` records a U-Net through the engine and edits a box, for the tests of ops the
engine supports or runs dense; ``edit_checked`` checks a recording and an edit against every
promise with nothing run dense. ``pure(pass_fn, gm, *args)``
also checks that the input graph is unchanged: same nodes, same arguments, same metadata keys
and values (the passes return what they find; they do not tag their input, docs/design.md,
"Stages").
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.fx as fx

import fisedit_compiler as fc
from fisedit_compiler import bench, ir, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.graph_keys import CACHE_INPUT, PLAN_INPUT


def linted(pass_fn, gm: fx.GraphModule, *args, **kwargs):
    result = pass_fn(gm, *args, **kwargs)
    graph = result.graph if isinstance(result, fx.GraphModule) else result
    if isinstance(graph, fx.Graph):
        graph.lint()
    return result


def snapshot(gm: fx.GraphModule) -> tuple:
    """What a pass must not change in its input: the code, graph-level meta keys and, per node,
    its arguments and metadata (by identity of the values, so in-place edits show too)."""
    nodes = tuple((node.name, node.op, str(node.target), str(node.args), str(node.kwargs),
                   tuple(sorted((key, id(value)) for key, value in node.meta.items())))
                  for node in gm.graph.nodes)
    return str(gm.graph), tuple(sorted(gm.meta)), nodes


def pure(pass_fn, gm: fx.GraphModule, *args, **kwargs):
    before = snapshot(gm)
    result = linted(pass_fn, gm, *args, **kwargs)
    assert snapshot(gm) == before, f"{pass_fn.__name__} changed its input graph"
    return result


def edit_outputs(engine, inputs: dict, mask, edited: dict, *graphs: fx.GraphModule) -> list:
    """Each edit graph's output for ``edited`` under ``engine.plan(mask)``, on step 0 of a
    recording of ``inputs`` by ``engine``."""
    cache = engine.new_cache()
    engine.record(cache, step=0, **inputs)
    plan = engine.plan(mask)
    return [gm(**flatten_inputs(edited), **{PLAN_INPUT: plan, CACHE_INPUT: cache.steps[0]})
            for gm in graphs]


def box_edit(unet, rows: slice, cols: slice):
    """Compile ``unet`` (16x16 latent), record step 0, checking that the recording is the
    U-Net's output, then edit the box ``rows`` x ``cols``. Returns a namespace: ``engine``,
    ``cache``, ``inputs``, ``recorded``, the warnings the recording raised (``caught``) and the
    edit's relative ``error`` against the oracle."""
    inputs = zoo.example_inputs(unet)
    engine = fc.compile(unet)
    cache = engine.new_cache(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded = engine.record(cache, 0, **inputs)
    with torch.no_grad():
        assert (recorded - unet(**inputs)[0]).abs().max() <= 1e-5
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[rows, cols] = True
    plan = engine.plan(mask)
    new = dict(inputs, sample=inputs["sample"] + mask * torch.randn_like(inputs["sample"]))
    result = engine.edit(cache, 0, plan=plan, **new)
    expected = fc.oracle.masked_dense(engine, plan, inputs, new)
    return types.SimpleNamespace(engine=engine, cache=cache, inputs=inputs, recorded=recorded,
                                 caught=caught,
                                 error=((result - expected).norm() / expected.norm()).item())


def attention_nodes(gm):
    return [node for node in gm.graph.nodes if ir.is_call(node, ir.attention)]


def edit_checked(unet, inputs, mask, config=fc.SparseConfig(), tolerance=1e-5):
    """Record, edit ``mask``: the recording is the U-Net's output, nothing runs dense, the edit
    meets the oracle and equals the recording outside the plan's region, bit for bit."""
    engine = fc.compile(unet, config)
    cache = engine.new_cache(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded = engine.record(cache, 0, **inputs)
    assert not [w for w in caught if "run dense in edits" in str(w.message)]
    with torch.no_grad():
        eager = unet(**inputs)[0]
    assert bench.relative_error(recorded, eager) <= tolerance
    plan = engine.plan(mask)
    edited = bench.edited_inputs(inputs, mask)
    result = engine.edit(cache, 0, plan=plan, **edited)
    assert bench.relative_error(result, fc.oracle.masked_dense(engine, plan, inputs,
                                                               edited)) <= tolerance
    outside = ~plan[0].active
    assert torch.equal(result[..., outside], recorded[..., outside])
    return engine


def box(rows, cols, size=16):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask
