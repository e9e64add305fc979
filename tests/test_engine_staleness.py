"""A U-Net changed after fc.compile in ways other than in-place weight writes (FreeU, attention
processors, adapters, replaced parameters, swapped weight storages) is refused, naming the
change, instead of being computed as it was when compiled (engine/module_state.py)."""

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.engine.module_state import ModuleState


def box(y0, x0, y1, x1, size=(16, 16)):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def snapshot(cache):
    return {step: store.buffer.clone() for step, store in cache.steps.items()}


def same_cache(cache, before):
    return set(cache.steps) == set(before) and all(
        torch.equal(cache.steps[step].buffer, buffer) for step, buffer in before.items())


@pytest.fixture(scope="module")
def compiled():
    """sd15-tiny compiled, two steps recorded, a reference edit of each; tests change the
    U-Net, check the refusals, and undo the change."""
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    later = dict(inputs, timestep=inputs["timestep"] - 100)
    cache = engine.new_cache(2)
    engine.record(cache, 0, **inputs)
    engine.record(cache, 1, **later)
    plan = engine.plan(box(2, 2, 6, 6))
    edits = [engine.edit(cache, 0, plan, **inputs), engine.edit(cache, 1, plan, **later)]
    return engine, cache, inputs, later, plan, edits


# Each: (change(unet) -> undo(), a pattern of the message naming the change).
def enable_freeu(unet):
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)

    def undo():     # disable_freeu leaves the attributes as None: remove them
        for block in unet.up_blocks:
            for name in ("s1", "s2", "b1", "b2"):
                block.__dict__.pop(name, None)
    return undo


def swap_processors(unet):
    from diffusers.models.attention_processor import AttnProcessor

    previous = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    return lambda: unet.set_attn_processor(previous)


def fresh_processors(unet):
    """New processors of the same class (what disable_attention_slicing does): no visible
    change in the class names, so the message must say what was replaced."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor(type(next(iter(previous.values())))())
    return lambda: unet.set_attn_processor(previous)


def replace_parameter(unet):
    old = unet.conv_out.weight
    unet.conv_out.weight = torch.nn.Parameter(old.detach() * 2)

    def undo():
        unet.conv_out.weight = old
    return undo


def load_state_dict_assign(unet):
    old = dict(unet.named_parameters())
    unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()}, assign=True)

    def undo():
        for name, param in old.items():
            owner, _, attr = name.rpartition(".")
            setattr(unet.get_submodule(owner), attr, param)
    return undo


def assign_data(unet):
    weight = unet.mid_block.resnets[0].conv1.weight
    old = weight.data
    weight.data = old * 2       # what PEFT's merge does: no version counter moves

    def undo():
        weight.data = old
    return undo


def train_mode(unet):
    unet.train()
    return unet.eval


def forward_hook(unet):
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: output)
    return handle.remove


def chunking(unet):
    blocks = [module for module in unet.modules() if hasattr(module, "set_chunk_feed_forward")]
    for block in blocks:        # what UNet3DConditionModel.enable_forward_chunking does
        block.set_chunk_feed_forward(1, dim=1)

    def undo():
        for block in blocks:
            block.set_chunk_feed_forward(None, dim=0)
    return undo


CHANGES = [
    (enable_freeu, r"attribute\(s\) b1, b2, s1, s2 added to up_blocks.0"),
    (swap_processors, r"attribute .*attn1.processor was replaced: AttnProcessor2_0 -> "
                      r"AttnProcessor"),
    (fresh_processors, r"attribute .*attn1.processor was replaced by another "
                       r"AttnProcessor2_0 object \(only the very object it had undoes that\)"),
    (replace_parameter, r"conv_out.weight replaced by other tensors \(module.weight = "
                        r"nn.Parameter"),
    (load_state_dict_assign, r"replaced by other tensors .*load_state_dict\(assign=True\)"),
    (assign_data, r"the storage of weight\(s\) mid_block.resnets.0.conv1.weight was replaced "
                  r"\(a .data assignment"),
    (train_mode, r"attribute training changed from False to True"),
    (forward_hook, r"forward hooks on mid_block: 0 -> 1"),
    (chunking, r"attribute .*_chunk_size changed from None to 1"),
]


@pytest.mark.parametrize("change, message", CHANGES, ids=lambda c: getattr(c, "__name__", ""))
def test_a_unet_changed_after_compile_is_refused_and_the_recording_kept(compiled, change,
                                                                        message):
    engine, cache, inputs, later, plan, edits = compiled
    before, traces, programs = snapshot(cache), dict(engine._traces), dict(engine._programs)
    undo = change(engine.unet)
    try:
        expected = rf"U-Net changed since it was compiled: .*{message}.*compile it again"
        with pytest.raises(fc.FiseditError, match=expected):
            engine.record(engine.new_cache(1), 0, **inputs)
        with pytest.raises(fc.FiseditError, match=expected):
            engine.edit(cache, 0, plan, **inputs)
        with pytest.raises(fc.FiseditError, match=expected):
            engine.record(cache, 1, **later)
        with pytest.raises(fc.FiseditError, match=expected):
            engine.prepare(cache, 0, **inputs)
        other = engine.with_config(fc.SparseConfig(tile=2))    # shares the captured graphs
        with pytest.raises(fc.FiseditError, match=expected):
            other.record(other.new_cache(1), 0, **inputs)
        assert same_cache(cache, before)
        assert engine._traces == traces and engine._programs == programs
    finally:
        undo()
    # Undone, the U-Net is the compiled one again: the recording edits as before.
    assert torch.equal(engine.edit(cache, 0, plan, **inputs), edits[0])
    assert torch.equal(engine.edit(cache, 1, plan, **later), edits[1])


def test_a_dtype_round_trip_is_refused_as_a_change_it_does_not_undo():
    """.to(float64).to(float32) leaves every value as it was but in new storage, which the
    engine's graphs do not read: the message says the round trip does not undo the change."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    unet.to(torch.float64).to(torch.float32)
    with pytest.raises(fc.FiseditError, match=r"storage of weight\(s\) .* was replaced .*a "
                                              r"\.to\(\) back to the old dtype or device makes "
                                              r"new storage again and does not undo it"):
        engine.edit(cache, 0, engine.plan(box(2, 2, 6, 6)), **inputs)


def test_compiled_again_after_the_change_the_engine_computes_the_changed_unet():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    old = fc.compile(unet)
    old.record(old.new_cache(1), 0, **inputs)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with torch.no_grad():
        eager = unet(**inputs)[0]
    engine = fc.compile(unet)
    cache = engine.new_cache(1)
    torch.testing.assert_close(engine.record(cache, 0, **inputs), eager, rtol=1e-5, atol=1e-5)
    unet.disable_freeu()      # s1..b2 now None: another state than the compiled one
    with pytest.raises(fc.FiseditError, match="s1 changed from 0.9 to None"):
        engine.edit(cache, 0, engine.plan(box(2, 2, 6, 6)), **inputs)


def test_freeu_disabled_again_is_the_compiled_unet_and_enabled_again_is_not():
    """disable_freeu leaves FreeU's factors as None, which diffusers reads as no FreeU: the
    U-Net compiled without FreeU edits again, as it did; enabling FreeU once more is refused."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    plan = engine.plan(box(2, 2, 6, 6))
    before = engine.edit(cache, 0, plan, **inputs)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(fc.FiseditError, match=r"b1, b2, s1, s2 added to up_blocks.0"):
        engine.edit(cache, 0, plan, **inputs)
    unet.disable_freeu()
    assert torch.equal(engine.edit(cache, 0, plan, **inputs), before)
    engine.record(cache, 0, **inputs)                 # the full comparison passes again
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(fc.FiseditError, match="s1 changed from None to 0.9"):
        engine.edit(cache, 0, plan, **inputs)
    unet.disable_freeu()
    # Another attribute added as None is no change either; one added with a value is.
    unet.up_blocks[0].resolution_idx_hint = None
    assert torch.equal(engine.edit(cache, 0, plan, **inputs), before)
    unet.up_blocks[0].resolution_idx_hint = 3
    with pytest.raises(fc.FiseditError, match="resolution_idx_hint changed from None to 3"):
        engine.edit(cache, 0, plan, **inputs)


def test_a_weight_replaced_mid_pass_is_refused_at_the_next_step(compiled):
    """Later steps of an edit pass compare only the weights' identities, data addresses and
    versions: a replaced parameter or a .data assignment (a LoRA fused by a step-end
    callback) is refused at once; a change the full comparison sees (FreeU) is refused at the
    first step of the next pass."""
    engine, cache, inputs, later, plan, edits = compiled
    for change, message in ((replace_parameter, "conv_out.weight replaced"),
                            (assign_data, r"storage of weight\(s\) mid_block.resnets.0.conv1")):
        engine.edit(cache, 0, plan, **inputs)                    # the pass's first step
        undo = change(engine.unet)
        try:
            with pytest.raises(fc.FiseditError, match=message):
                engine.edit(cache, 1, plan, **later)
        finally:
            undo()
        assert torch.equal(engine.edit(cache, 1, plan, **later), edits[1])
    undo = enable_freeu(engine.unet)
    try:
        with pytest.raises(fc.FiseditError, match="s1"):     # a new pass: compared in full
            engine.edit(cache, 0, plan, **inputs)
        other = engine.plan(box(1, 1, 3, 3))
        with pytest.raises(fc.FiseditError, match="s1"):     # another plan: a new pass
            engine.edit(cache, 1, other, **later)
    finally:
        undo()


def test_the_session_refuses_a_changed_unet_before_any_dense_step():
    """EditSession checks the engine before the edit's first U-Net call (which runs the module
    itself, with the new weights, for the mask estimate's dense probe steps)."""
    pipe = zoo.pipeline("sd15-tiny")
    pipe.set_progress_bar_config(disable=True)
    session = fc.EditSession(pipe)
    session.generate("a red circle", num_inference_steps=2, output_type="latent")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(fc.FiseditError, match="forward pre-hooks on the U-Net: 0 -> 1"):
        session.edit("a blue circle", mask_estimator="probe", output_type="latent")
    assert calls == []


# --- the fingerprint itself -----------------------------------------------------------------

@pytest.mark.parametrize("frontend", ["export", "dynamo"])
@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny", "ddpm-tiny"])
def test_an_unchanged_unet_keeps_its_fingerprint_through_capture_record_and_edit(name,
                                                                                  frontend):
    unet = zoo.unet(name)
    engine = fc.compile(unet, fc.SparseConfig(frontend=frontend))
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    size = tuple(inputs["sample"].shape[-2:])
    engine.edit(cache, 0, engine.plan(box(1, 1, 4, 4, size)), **inputs)
    with torch.no_grad():
        unet(**inputs)
    assert engine._state.changes() == []
    assert ModuleState(unet).changes() == []


class _Processor(torch.nn.Module):
    """An attention processor held as a module, as diffusers' IP-Adapter ones are."""

    def __init__(self):
        super().__init__()
        self.scale = [1.0, 0.5]


class _Plain:
    """An attention processor that is no module, with a setting."""

    def __init__(self):
        self.slice_size = 2


def test_settings_changed_in_place_and_private_flags_are_seen():
    """PEFT keeps its flags private (``_disable_adapters``) and its merged adapters in a list
    it appends to; IP-Adapter processors keep their scales in a list changed in place."""
    layer = torch.nn.Linear(2, 2)
    layer._disable_adapters = True
    layer.merged_adapters = []
    layer.scaling = {"default": 1.0}
    layer.processor = _Plain()
    layer.add_module("ip", _Processor())
    state = ModuleState(layer)
    assert state.changes() == []
    layer.merged_adapters.append("default")
    layer.scaling["default"] = 0.5
    layer.processor.slice_size = 1
    layer.ip.scale[0] = 0.0
    layer._disable_adapters = False
    changes = " | ".join(state.changes())
    for expected in ("merged_adapters changed from () to ('default',)",
                     "scaling changed from (('default', 1.0),) to (('default', 0.5),)",
                     "processor.slice_size changed from 2 to 1",
                     "ip.scale changed from (1.0, 0.5) to (0.0, 0.5)",
                     "_disable_adapters changed from True to False"):
        assert expected in changes


def test_a_value_that_no_longer_compares_is_a_change():
    layer = torch.nn.Linear(2, 2)
    layer.factor = 1.0
    state = ModuleState(layer)
    layer.factor = torch.ones(3)        # == gives no bool: still told, not raised
    assert state.changes() == ["attribute factor changed from 1.0 to tensor([1., 1., 1.])"]
    del layer.factor
    assert state.changes() == ["attribute(s) factor removed from the U-Net"]


def test_the_per_step_check_sees_replaced_tensors_and_storages_only():
    layer = torch.nn.Linear(2, 2)
    state = ModuleState(layer)
    layer.eps = 0.1
    assert state.same_tensors() and state.same_storages() and state.changes()
    layer.weight.data = layer.weight.data.clone()
    assert state.same_tensors() and not state.same_storages()
    layer.bias = torch.nn.Parameter(torch.zeros(2))
    assert not state.same_tensors()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_full_size_unets_keep_their_fingerprint(name):
    unet = zoo.unet(name)
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet, batch=1, seed=0, height=16, width=16, text_length=8)
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    engine.edit(cache, 0, engine.plan(box(1, 1, 4, 4)), **inputs)
    assert engine._state.changes() == []
