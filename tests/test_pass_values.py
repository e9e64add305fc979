"""engine.pass_values: the pass constants are computed at an edit pass's first step unless the
pass brings the bits of the last computation's inputs under the same weights, and again on its
later steps whenever what they are computed from changes (new or rewritten text states,
weights changed in place).

Every edit here is compared with an engine that computes them at every step
(``hoist_pass_constants=False``), bit for bit. The CUDA-graph side (static buffers loaded once
per pass) is tested in test_cuda_graph.py."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.engine.pass_values import PassValues

STEPS = 3


@pytest.fixture(scope="module")
def unet():
    return zoo.unet("sd15-tiny")


class Editing:
    """An engine with a recording of ``STEPS`` identical steps, and an engine without pass
    constants recording the same, to edit side by side."""

    def __init__(self, unet, **config):
        # Without the query fold, which the reference engine (no pass constants) cannot run
        # (it is bit for bit the same only up to rounding: test_passes_fold_text_queries.py).
        config = dict(config, fold_text_queries=False)
        self.inputs = zoo.example_inputs(unet, batch=2, seed=0)
        self.engine = fc.compile(unet, fc.SparseConfig(**config))
        self.reference = self.engine.with_config(
            fc.SparseConfig(**config, hoist_pass_constants=False))
        self.mask = bench.blob_mask((16, 16), 0.1)
        self.record()

    def record(self):
        self.caches = []
        for engine in (self.engine, self.reference):
            cache = engine.new_cache(STEPS)
            for step in range(STEPS):
                engine.record(cache, step, **self.inputs)
            self.caches.append(cache)

    def edit_pass(self, edited: dict, between=None) -> list:
        """A pass over every step, checked against the reference engine's. ``between(inputs)``
        runs after each step but the last, on that engine's own copy of ``edited``."""
        outputs = []
        for engine, cache in zip((self.engine, self.reference), self.caches):
            plan = engine.plan(self.mask)
            inputs = edited if between is None else {
                name: value.clone() if isinstance(value, torch.Tensor) else value
                for name, value in edited.items()}
            outputs.append([])
            for step in range(STEPS):
                outputs[-1].append(engine.edit(cache, step, plan, **inputs))
                if between is not None and step + 1 < STEPS:
                    between(inputs)
        for hoisted, computed in zip(*outputs):
            assert torch.equal(hoisted, computed)
        return outputs[0]

    @property
    def computed(self) -> int:
        return self._pass_values.computed

    @property
    def reused(self) -> int:
        return self._pass_values.reused

    @property
    def _pass_values(self):
        return self.engine._pass_values[self.engine.program(self.inputs).signature]

    def edited(self, shift: float) -> dict:
        edited = bench.edited_inputs(self.inputs, self.mask)
        return dict(edited, encoder_hidden_states=self.inputs["encoder_hidden_states"] + shift)


def test_a_pass_computes_its_constants_once(unet):
    editing = Editing(unet)
    edited = editing.edited(0.5)
    editing.edit_pass(edited)
    assert editing.computed == 1
    editing.edit_pass(edited)                   # the same prompt again (a new mask's pass)
    assert (editing.computed, editing.reused) == (1, 1)
    editing.edit_pass(editing.edited(-0.5))     # a new prompt
    assert (editing.computed, editing.reused) == (2, 1)
    editing.edit_pass(editing.edited(0.5))      # the first prompt's bits, in a new tensor
    assert (editing.computed, editing.reused) == (3, 1)
    editing.edit_pass(editing.edited(0.5))
    assert (editing.computed, editing.reused) == (3, 2)


def test_a_new_pass_compares_its_inputs_bit_for_bit(unet):
    """Values equal as numbers but not as bits (0.0 and -0.0), and values changed where no
    version counter or address shows it, are new inputs: the constants are computed again."""
    editing = Editing(unet)
    edited = editing.edited(0.5)
    text = edited["encoder_hidden_states"]
    with torch.no_grad():
        text[0, 0, :4] = 0.0
    editing.edit_pass(edited)
    with torch.no_grad():
        text.data[0, 0, :4] = -0.0              # no version counter moves
    editing.edit_pass(edited)
    assert (editing.computed, editing.reused) == (2, 0)
    text.data[0, 0, 0] = 1.0
    editing.edit_pass(edited)
    assert (editing.computed, editing.reused) == (3, 0)


def test_text_states_rewritten_in_place_mid_pass_are_seen(unet):
    """A step-end callback that rewrites the prompt embeddings between two steps of a pass."""
    editing = Editing(unet)
    edited = editing.edited(0.5)

    def rewrite(inputs):
        inputs["encoder_hidden_states"].mul_(-1)            # the same tensor, new values

    outputs = editing.edit_pass(edited, between=rewrite)
    assert editing.computed == STEPS and not torch.equal(outputs[0], outputs[1])

    def reassign(inputs):
        # A .data assignment moves the storage and leaves the version counter as it was.
        inputs["encoder_hidden_states"].data = inputs["encoder_hidden_states"].data * 3

    editing.edit_pass(edited, between=reassign)
    # This pass's first step brings the bits the last step computed from (the first
    # callback's two sign changes cancel): reused; its later steps see the reassignments.
    assert (editing.computed, editing.reused) == (2 * STEPS - 1, 1)


def test_writes_that_move_no_version_counter_are_seen_by_the_next_pass(unet):
    """``.data`` writes between passes (a CUDA graph replayed into the text states' buffer
    writes so): the next pass's first step computes the constants from the new values."""
    editing = Editing(unet)
    edited = editing.edited(0.5)
    first = editing.edit_pass(edited)
    edited["encoder_hidden_states"].data.mul_(-1)
    second = editing.edit_pass(edited)      # checked against the engine without constants
    assert not torch.equal(first[0], second[0])


def test_weights_changed_in_place_are_seen(unet):
    """A LoRA fused into the text K projections (in place), then the generation recorded again:
    the same text tensor now projects to other K/V."""
    editing = Editing(unet)
    edited = editing.edited(0.5)
    before = editing.edit_pass(edited)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "attn2.to_k" in name:
                parameter.add_(0.05)
    try:
        editing.record()
        after = editing.edit_pass(edited)        # a recording drops the kept values
        assert editing.computed == 1 and not torch.equal(before[0], after[0])
    finally:
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "attn2.to_k" in name:
                    parameter.sub_(0.05)


def test_values_are_reused_only_under_the_weights_they_were_computed_under(unet):
    """The weights are told by value (what the engine checked them against), not by a token
    of the engine's: PassValues reuses the values at a new pass only for equal weights, and
    never for weights that cannot be told (None)."""
    editing = Editing(unet)
    program = editing.engine.program(editing.inputs)
    pass_values = PassValues(program.pass_constants)
    flat = editing.engine.flat(editing.edited(0.5))
    with torch.no_grad():
        first = pass_values(flat, ("versions", "values"), new_pass=True)
        assert pass_values(flat, ("versions", "values"), new_pass=True) is first
        assert pass_values(flat, ("versions", "other values"), new_pass=True) is not first
        assert pass_values(flat, ("versions", "other values"), new_pass=False) is not first
        for _ in range(2):
            pass_values(flat, None, new_pass=True)
    assert (pass_values.computed, pass_values.reused) == (4, 1)


def test_recordings_under_other_weights_edit_with_their_own_constants(unet):
    """Two recordings of one engine under weights that differ by a .data write (no version
    counter moves), edited in turn with one text: each pass computes the constants under
    its recording's weights, and a pass that repeats the last one reuses them."""
    editing = Editing(unet, group_projections=False)
    edited = editing.edited(0.5)
    weights = [p for name, p in unet.named_parameters() if "attn2.to_k" in name]
    original = [weight.detach().clone() for weight in weights]

    def use(values, caches):
        for weight, value in zip(weights, values):
            weight.data.copy_(value)
        editing.caches = caches

    editing.record()
    first_caches = editing.caches
    for weight in weights:
        weight.data.mul_(1.5)
    try:
        editing.record()
        scaled_outputs = editing.edit_pass(edited)       # each checked against the reference
        use(original, first_caches)
        original_outputs = editing.edit_pass(edited)
        assert not torch.equal(scaled_outputs[0], original_outputs[0])
        assert (editing.computed, editing.reused) == (2, 0)
        editing.edit_pass(edited)
        assert (editing.computed, editing.reused) == (2, 1)
    finally:
        use(original, first_caches)


def test_inference_tensors_are_computed_at_every_step(unet):
    """An inference tensor has no version counter: an in-place write could not be told."""
    editing = Editing(unet)
    with torch.inference_mode():
        edited = {name: value.clone() if isinstance(value, torch.Tensor) else value
                  for name, value in editing.edited(0.5).items()}
        editing.edit_pass(edited)
    assert editing.computed == STEPS


def test_weights_written_without_a_version_count_then_recorded_again_are_seen(unet):
    """An EMA model's copy_to writes param.data: no version counter moves, so nothing can tell
    mid-recording, but a generation recorded afterwards edits with constants of its weights.
    Ungrouped projections, so that the constants graph reads the text K weights directly."""
    editing = Editing(unet, group_projections=False)
    edited = editing.edited(0.5)
    before = editing.edit_pass(edited)
    weights = [p for name, p in unet.named_parameters() if "attn2.to_k" in name]
    saved = [weight.detach().clone() for weight in weights]
    for weight in weights:
        weight.data.mul_(1.5)
    try:
        editing.record()
        after = editing.edit_pass(edited)         # the same text tensor as before
        assert editing.computed == 1 and not torch.equal(before[0], after[0])
    finally:
        for weight, value in zip(weights, saved):
            weight.data.copy_(value)


def test_graph_static_buffers_take_each_pass_constants_once(unet, monkeypatch):
    """The CUDA-graph path's bookkeeping, on the CPU: ``CapturedSteps`` with a stand-in for
    the captured graph whose replay runs the step again on the static buffers (what a real
    replay computes). Each pass loads the constants' buffers once, at its first step (the
    later steps keep them), and an input only the constants read has no buffer. The real
    graphs are tested on the GPU in test_cuda_graph.py."""
    from fisedit_compiler.engine import cuda_graph

    copies = []

    def fake_capture(steps, template):
        output = steps._run(template)
        graph = SimpleNamespace(replay=lambda: output.copy_(steps._run(template)))
        return cuda_graph._Graph(graph, template if template.bucket is not None else None,
                                 output, steps)

    def counting_copy_into(static, value):
        copies.append(static)           # the whole tuple, then (recursively) each value
        original_copy_into(static, value)

    original_copy_into = cuda_graph._copy_into
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(cuda_graph.CapturedSteps, "_capture", fake_capture)
    monkeypatch.setattr(cuda_graph, "_copy_into", counting_copy_into)
    editing = Editing(unet)
    graphs = editing.engine
    monkeypatch.setattr(graphs, "_uses_graphs", lambda device: True)
    eager = graphs.with_config(dataclasses.replace(graphs.config, cuda_graphs=False))
    cache, eager_cache = editing.caches[0], eager.new_cache(STEPS)
    for step in range(STEPS):
        eager.record(eager_cache, step, **editing.inputs)
    first, second = editing.edited(0.5), editing.edited(-0.5)
    steps = graphs.captured_steps(**editing.inputs)
    for edited, reloads in ((first, 0), (second, 1), (second, 1), (first, 2)):
        plan = graphs.plan(editing.mask, bucketed=True)
        eager_plan = eager.plan(editing.mask, bucketed=True)
        for step in range(STEPS):
            replayed = graphs.edit(cache, step, plan, **edited)
            assert torch.equal(replayed, eager.edit(eager_cache, step, eager_plan, **edited))
        # The first pass's values were cloned into the buffers; a later pass's copied once,
        # unless it had the last pass's text (its values then are the ones loaded).
        assert sum(static is steps.values for static in copies) == reloads
    assert steps.inputs["encoder_hidden_states"] is None and "sample" in steps.read
