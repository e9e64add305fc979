"""The torch.compile backend "fisedit": registration, record/edit contexts, guards, fallbacks.

The fresh-interpreter check (entry point, every tiny zoo U-Net) runs in a subprocess that the
module fixture starts first, so it overlaps the in-process tests; the last test collects it.
"""

import json
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from diffusers.models.attention_processor import AttnProcessor2_0

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.backend import UnsupportedGraphWarning, fisedit_backend

TINY = [name for name in zoo.MODEL_NAMES if name.endswith("-tiny")]
TOLERANCE = 1e-5   # fp32 relative error against the oracle


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def box(size, y0, x0, y1, x1):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def call(unet, inputs, timestep):
    """A U-Net call exactly as StableDiffusionPipeline makes it (positional sample and t)."""
    return unet(inputs["sample"], timestep, encoder_hidden_states=inputs["encoder_hidden_states"],
                timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                return_dict=False)[0]


def edited(inputs, mask, seed=1):
    """New latents inside ``mask`` and a new prompt: what an edit step sees."""
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(seed))
    return dict(inputs, sample=torch.where(mask, inputs["sample"] + noise, inputs["sample"]),
                encoder_hidden_states=inputs["encoder_hidden_states"] + 0.1)


# ------------------------------------------------------------------- fresh interpreter (spawn)

FRESH = r'''
import json, sys, time, warnings
import torch
import diffusers

torch.set_num_threads(1)
spec = torch.load(sys.argv[1], weights_only=False)
result = {"listed": "fisedit" in torch._dynamo.list_backends(), "models": {}}
result["imported_first"] = "fisedit_compiler" in sys.modules
for name, (cls_name, cfg, inputs, mask) in spec.items():
    torch.manual_seed(0)
    unet = getattr(diffusers, cls_name)(**cfg).eval()
    compiled = torch.compile(unet, backend="fisedit")
    row = {}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = unet(**inputs)[0]
        row["dense_max_abs"] = (compiled(**inputs)[0] - eager).abs().max().item()
        import fisedit_compiler as fc   # already loaded by torch, through the entry point
        with fc.recording(compiled) as rec:
            recorded = compiled(**inputs)[0]
        row["record_rel"] = ((recorded - eager).norm() / eager.norm()).item()
        new = dict(inputs, sample=torch.where(mask, inputs["sample"] + 0.5, inputs["sample"]))
        with fc.editing(rec, mask) as ed:
            out = compiled(**new)[0]
        ref = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[0], ed.inputs[0])
        row["edit_oracle_rel"] = ((out - ref).norm() / ref.norm()).item()
        with fc.editing(rec, torch.zeros_like(mask)):
            row["empty_equal"] = torch.equal(compiled(**inputs)[0], recorded)
    row["unsupported"] = [str(w.message) for w in caught
                          if type(w.message).__name__ == "UnsupportedGraphWarning"]
    result["models"][name] = row
print(json.dumps(result))
'''


@pytest.fixture(scope="module", autouse=True)
def isolated():
    """One thread, and Dynamo's caches reset before and after this module.

    Tiny models need no intra-op threads, and the fresh interpreter runs beside us: with two
    OpenMP pools on two cores every small op waits for a busy core. The reset keeps compiles
    of other test modules from counting towards Dynamo's recompile limit here, and ours there.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def fresh_interpreter(tmp_path_factory, isolated):
    """Start ``torch.compile(unet, backend="fisedit")`` on every tiny zoo U-Net in a fresh
    interpreter that never imports fisedit_compiler itself: torch must find the backend
    through the ``torch_dynamo_backends`` entry point."""
    folder = tmp_path_factory.mktemp("fresh")
    spec = {}
    for name in TINY:
        unet = zoo.unet(name)
        inputs = zoo.example_inputs(unet, batch=2, seed=1)
        inputs.pop("return_dict")
        h, w = zoo.latent_size(unet)
        spec[name] = (zoo.CONFIGS[name][0], zoo.config(name), inputs,
                      box((h, w), h // 4, w // 3, h // 2, w // 2 + 2))
    torch.save(spec, folder / "spec.pt")
    (folder / "fresh.py").write_text(FRESH)
    process = subprocess.Popen([sys.executable, str(folder / "fresh.py"), str(folder / "spec.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=folder)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


# ----------------------------------------------------------------------------- in process

@pytest.fixture(scope="module")
def sd15():
    """The tiny SD U-Net compiled fullgraph and strict (so its program is built at compile)."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit", fullgraph=True, options={"strict": True})
    return unet, compiled, zoo.example_inputs(unet, batch=2, seed=0)


def test_registered():
    from torch._dynamo.backends.registry import lookup_backend

    assert "fisedit" in torch._dynamo.list_backends()
    assert lookup_backend("fisedit") is fisedit_backend
    assert fc.fisedit_backend is fisedit_backend


@torch.no_grad()
def test_dense_outside_contexts(sd15):
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    assert torch.equal(call(compiled, inputs, t), call(unet, inputs, t))


def test_gradient_checkpointing_with_gradients_on_is_named():
    """Dynamo wraps checkpointed blocks in regions export cannot lower: the fallback says why
    and what to do, instead of an error from inside torch.export."""
    unet = zoo.unet("sd15-tiny")
    unet.enable_gradient_checkpointing()
    compiled = torch.compile(unet, backend="fisedit")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    with pytest.warns(UnsupportedGraphWarning, match=r"gradient checkpointing while gradients "
                      r"are on.*torch.no_grad\(\).*disable_gradient_checkpointing"):
        with fc.recording(compiled) as rec:
            call(compiled, inputs, torch.tensor(500))
    assert rec.num_steps == 0


@pytest.fixture(scope="module")
def engine_for():
    engines = {}

    def get(unet):
        if id(unet) not in engines:
            engines[id(unet)] = fc.compile(unet)
        return engines[id(unet)]

    return get


@pytest.mark.parametrize("policy", [("incremental", "full"), ("cached", "sparse")],
                         ids=lambda p: "-".join(p))
@torch.no_grad()
def test_record_edit_equal_engine_and_oracle(sd15, engine_for, policy):
    unet, compiled, inputs = sd15
    config = fc.SparseConfig(group_norm=policy[0], self_attention=policy[1])
    timesteps = [torch.tensor(700), torch.tensor(500)]   # a 0-d t, as pipelines pass it
    mask = box((16, 16), 3, 5, 9, 10)
    new = edited(inputs, mask)

    with fc.recording(compiled, config) as rec:
        recorded = [call(compiled, inputs, t) for t in timesteps]
    assert rec.num_steps == 2 and rec.latent_size == (16, 16)
    assert rec.inputs[1]["sample"].shape[0] == 2 and int(rec.inputs[1]["timestep"]) == 500
    with fc.editing(rec, mask) as ed:
        edits = [call(compiled, new, t) for t in timesteps]
    assert ed.steps == [0, 1]

    # The engine API on the same inputs gives the same numbers, bit for bit.
    engine = engine_for(unet).with_config(config)
    cache = engine.new_cache(num_steps=2)
    plan = engine.plan(mask)
    for step, t in enumerate(timesteps):
        kwargs = dict(sample=inputs["sample"], timestep=t,
                      encoder_hidden_states=inputs["encoder_hidden_states"])
        assert torch.equal(engine.record(cache, step, **kwargs), recorded[step])
        kwargs.update(sample=new["sample"], encoder_hidden_states=new["encoder_hidden_states"])
        assert torch.equal(engine.edit(cache, step, plan, **kwargs), edits[step])
        # ... and the oracle (docs/design.md, "Oracle").
        ref = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[step], ed.inputs[step])
        assert relative_error(edits[step], ref) <= TOLERANCE
        assert torch.equal(ed.outputs[step], edits[step])
        assert relative_error(recorded[step], call(unet, inputs, t)) <= TOLERANCE

    # Empty mask: the recorded output; full mask: the dense U-Net on the edited inputs.
    with pytest.warns(UserWarning, match="marks no latent pixel"), \
            fc.editing(rec, torch.zeros(16, 16, dtype=torch.bool)):
        assert torch.equal(call(compiled, dict(new, sample=inputs["sample"]), timesteps[0]),
                           recorded[0])
    with fc.editing(rec, torch.ones(16, 16, dtype=torch.bool), start_step=1):
        full = call(compiled, new, timesteps[1])
    assert relative_error(full, call(unet, new, timesteps[1])) <= TOLERANCE


@torch.no_grad()
def test_context_errors(sd15):
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    with pytest.raises(fc.FiseditError, match="not compiled"):
        with fc.recording(unet):
            pass
    for thing in (None, 42, "unet", [unet]):         # no U-Net at all (some have no __dict__)
        with pytest.raises(fc.FiseditError, match="U-Net"):
            with fc.recording(thing):
                pass
    # Refused at once: the whole generation ran before a warning that nothing was recorded.
    for backend in ("eager", "inductor"):
        with pytest.raises(fc.FiseditError, match=f"compiled with the '{backend}' backend, so "
                                                  "no call of it reaches fc.recording"):
            with fc.recording(torch.compile(unet, backend=backend)):
                pass
    with pytest.raises(fc.FiseditError, match="SparseConfig.frontend='dynamo' chooses how "
                                              "fc.compile captures.*would be ignored"):
        with fc.recording(compiled, config=fc.SparseConfig(frontend="dynamo")):
            pass
    # The backend passed as the function is taken (not called here: each compile of the
    # forward with another backend counts towards Dynamo's recompile limit for the module).
    with pytest.warns(UnsupportedGraphWarning, match="the recording holds no U-Net call"):
        with fc.recording(torch.compile(unet, backend=fisedit_backend)):
            pass
    with pytest.raises(fc.FiseditError, match="not a diffusers U-Net"):
        with fc.recording(torch.compile(torch.nn.Linear(2, 2), backend="fisedit")):
            pass
    with pytest.raises(fc.FiseditError, match="Recording"):
        with fc.editing("not a recording", torch.zeros(16, 16, dtype=torch.bool)):
            pass

    with pytest.raises(fc.FiseditError, match="num_steps=1"):
        with fc.recording(compiled, num_steps=1):
            call(compiled, inputs, t)
            call(compiled, inputs, torch.tensor(400))
    with fc.recording(compiled) as rec:
        with pytest.raises(fc.FiseditError, match="already recording"):
            with fc.recording(compiled):
                pass
        call(compiled, inputs, t)
    assert rec.num_steps == 1
    with pytest.raises(fc.FiseditError, match="fc.recording takes the compiled U-Net or the "
                                              "pipeline holding it, got a Recording"):
        with fc.recording(rec):
            pass

    with pytest.warns(UnsupportedGraphWarning, match=r"holds no U-Net call.*called inside the "
                                                      r"context\?.*recompile_limit"):
        with fc.recording(compiled) as empty:
            pass
    with pytest.raises(fc.FiseditError, match="holds no U-Net call"):
        with fc.editing(empty, torch.zeros(16, 16, dtype=torch.bool)):
            pass

    with pytest.raises(fc.FiseditError, match="dtype bool"):
        with fc.editing(rec, torch.zeros(16, 16)):
            pass
    with pytest.raises(fc.FiseditError, match="image-resolution mask"):
        with fc.editing(rec, torch.zeros(128, 128, dtype=torch.bool)):
            pass
    mask = box((16, 16), 0, 0, 4, 4)
    with fc.editing(rec, mask):
        with pytest.raises(fc.FiseditError, match="timestep"):
            call(compiled, inputs, torch.tensor(400))          # not the recorded step's t
        call(compiled, inputs, t)                             # a failed call changed nothing
        with pytest.raises(fc.FiseditError, match="holds 1 steps"):
            call(compiled, inputs, t)                         # more calls than recorded
    assert torch.equal(call(compiled, inputs, t), call(unet, inputs, t))   # dense again


def test_contexts_are_single_use_and_say_how_a_recording_ended(sd15):
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    context = fc.recording(compiled)
    with context as rec:
        call(compiled, inputs, t)
    with pytest.raises(fc.FiseditError, match=r"fc.recording\(...\) context was entered "
                                              "already; each with-statement needs its own"):
        with context:
            pass
    mask = box((16, 16), 0, 0, 4, 4)
    editing = fc.editing(rec, mask)
    with editing:
        call(compiled, inputs, t)
    with pytest.raises(fc.FiseditError, match=r"fc.editing\(...\) context was entered"):
        with editing:
            pass
    # A plan for other tiles: the message names the tiles and the recording's way to a plan.
    other = fc.compile(unet, fc.SparseConfig(tile=2)).plan(mask)
    with pytest.raises(fc.FiseditError, match=r"with tiles \[2, 2\].*with tiles \[4, 2\].*"
                                              r"recording.plan\(mask\)"):
        rec.plan(other)
    # More steps asked for than the pipeline made: edits run the steps made.
    with pytest.warns(UserWarning, match="holds 1 U-Net calls but was made with num_steps=3"):
        with fc.recording(compiled, num_steps=3):
            call(compiled, inputs, t)
    # An exception ends the context: the recording may hold part of a generation.
    with pytest.raises(KeyError):
        with fc.recording(compiled) as interrupted:
            call(compiled, inputs, t)
            raise KeyError("the pipeline failed at its second step")
    assert interrupted.interrupted_by == "KeyError" and interrupted.num_steps == 1
    with pytest.warns(UserWarning, match="ended with a KeyError after 1 U-Net calls"):
        with fc.editing(interrupted, mask):
            call(compiled, inputs, t)
            with pytest.raises(fc.FiseditError, match="holds 1 steps.*ended with a KeyError"):
                call(compiled, inputs, torch.tensor(400))


@torch.no_grad()
def test_a_second_pipeline_run_in_one_context_is_refused_and_an_early_stop_warns(sd15):
    """A warm-up run and the real one inside one fc.recording were stored as one generation
    of more steps, and an edit read the warm-up's: a call whose timestep rises after falling
    ones is refused (a warm-up of fewer steps starts lower: "leading" spacing's 2 steps are
    501, 1), and the recording keeps its first run. In fc.editing a second run is named as
    such, after a whole first run or one stopped early; an edit that stops before the
    recording's last step warns (its output is not a finished edit)."""
    unet, compiled, inputs = sd15
    run = [torch.tensor(t) for t in (700, 400, 100)]
    with fc.recording(compiled) as rec:
        for t in run:
            call(compiled, inputs, t)
        with pytest.raises(fc.FiseditError, match=r"call 4 .* higher timestep than the call "
                                                  r"before.*second pipeline run.*new "
                                                  r"fc.recording"):
            call(compiled, inputs, run[0])
    assert rec.num_steps == 3 and len(rec.inputs) == 3
    with fc.recording(compiled, num_steps=2) as warm:
        for t in (501, 1):
            call(compiled, inputs, torch.tensor(t))
        with pytest.raises(fc.FiseditError, match="second pipeline run"):    # not num_steps
            call(compiled, inputs, torch.tensor(958))
    # Timesteps that repeat or rise from the first do not start a run again: Heun's pairs or
    # two calls a step, and an inversion's rising ones.
    for timesteps in ((700, 700, 400, 400), (1, 201, 401)):
        with fc.recording(compiled) as other:
            for t in timesteps:
                call(compiled, inputs, torch.tensor(t))
        assert other.num_steps == len(timesteps)
    mask = box((16, 16), 0, 0, 4, 4)
    for first_run in (run, run[:2]):             # the second run after a whole one, or not
        with pytest.warns(UserWarning, match="ended at step") if len(first_run) < 3 else \
                warnings.catch_warnings():
            with fc.editing(rec, mask):
                for t in first_run:
                    call(compiled, inputs, t)
                with pytest.raises(fc.FiseditError, match=rf"call {len(first_run) + 1} of "
                                                          r"this edit .* second pipeline run "
                                                          r"inside one fc.editing"):
                    call(compiled, inputs, run[0])
    with pytest.warns(UserWarning, match=r"ended at step 1 of a recording of 3 steps.*stopped "
                                         r"early"):
        with fc.editing(rec, mask):
            for t in run[:2]:
                call(compiled, inputs, t)
    assert len(warm.inputs) == 2


@torch.no_grad()
def test_an_edit_whose_first_sample_differs_outside_the_mask_is_refused(sd15):
    """Other noise (another seed) or rows of another meaning would be dropped outside the
    region, where the edit keeps the recording: refused at the first call, the recording
    intact; the later calls' latents may drift outside the mask."""
    unet, compiled, inputs = sd15
    timesteps = [torch.tensor(700), torch.tensor(500)]
    with fc.recording(compiled) as rec:
        recorded = [call(compiled, inputs, t) for t in timesteps]
    mask = box((16, 16), 3, 5, 9, 10)
    other_noise = dict(inputs, sample=torch.randn(inputs["sample"].shape,
                                                  generator=torch.Generator().manual_seed(7)))
    with fc.editing(rec, mask) as ed:
        with pytest.raises(fc.FiseditError, match=r"first U-Net call \(step 0\) is fed a "
                                                  r"sample that differs .*another seed"):
            call(compiled, other_noise, timesteps[0])
        nan = inputs["sample"].clone()
        nan[0, 0, 0, 0] = float("nan")
        with pytest.raises(fc.FiseditError, match="sample hold NaN or infinite values"):
            call(compiled, dict(inputs, sample=nan), timesteps[0])
        # Another timestep too (img2img's strength changed): named as the timestep.
        with pytest.raises(fc.FiseditError, match=r"step 0 was recorded at timestep \[700\] "
                                                  r"but the edit passes \[500\].*strength"):
            call(compiled, other_noise, timesteps[1])
        assert ed.steps == []
        call(compiled, edited(inputs, mask), timesteps[0])        # differs inside only
        call(compiled, other_noise, timesteps[1])                  # drifted: a later call
    assert ed.steps == [0, 1]
    with pytest.warns(UserWarning, match="marks no latent pixel"), \
            fc.editing(rec, torch.zeros(16, 16, dtype=torch.bool)) as empty:
        assert torch.equal(call(compiled, inputs, timesteps[0]), recorded[0])   # intact
    assert empty.steps == [0]


@pytest.fixture(scope="module")
def pipe():
    pipe = zoo.pipeline("sd15-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, steps=3):
    return pipe(prompt, num_inference_steps=steps, height=128, width=128, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_stock_pipeline_end_to_end(pipe):
    prompt, new_prompt = "a red cat on a sofa", "a blue dog on a sofa"
    eager, eager_new = generate(pipe, prompt), generate(pipe, new_prompt)
    pipe.unet = torch.compile(pipe.unet, backend="fisedit")

    assert abs(generate(pipe, prompt) - eager).max() == 0       # dense outside any context
    (graph,) = fc.backend.compiled_graphs(pipe)
    assert graph.programs_built == 0                              # nothing built until recording

    with fc.recording(pipe) as rec:                              # the pipeline itself is fine
        image = generate(pipe, prompt)
    assert abs(image - eager).max() < 1e-4
    assert rec.num_steps == 3                                     # one step per U-Net call
    assert graph.programs_built == 1
    assert all(x["sample"].shape == (2, 4, 16, 16) for x in rec.inputs)   # CFG batch

    # Same prompt, empty mask: every step returns its recorded output, so the same image.
    with pytest.warns(UserWarning, match="marks no latent pixel"), \
            fc.editing(rec, torch.zeros(16, 16, dtype=torch.bool)):
        assert (generate(pipe, prompt) == image).all()
    # New prompt, full mask: dense regeneration with the new prompt.
    with fc.editing(rec, torch.ones(16, 16, dtype=torch.bool)):
        assert abs(generate(pipe, new_prompt) - eager_new).max() < 1e-4
    # New prompt, a mask: each U-Net call is the oracle's edit of its recorded step. (The
    # latents drift outside the mask here; keeping them is the editing flow's job.)
    with rec.editing(box((16, 16), 3, 6, 9, 12)) as ed:          # = fc.editing(rec, mask)
        generate(pipe, new_prompt)
    assert ed.steps == [0, 1, 2]
    for k, step in enumerate(ed.steps):
        ref = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[step], ed.inputs[k])
        assert relative_error(ed.outputs[k], ref) <= TOLERANCE
    with pytest.raises(fc.FiseditError, match="timestep"):
        with fc.editing(rec, ed.plan):
            generate(pipe, new_prompt, steps=4)                    # another schedule


def _unsupported(caught):
    return [str(w.message) for w in caught if issubclass(w.category, UnsupportedGraphWarning)]


class GraphBreakProcessor(AttnProcessor2_0):
    """Diffusers' attention with a graph break: Dynamo splits every U-Net call."""

    def __call__(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return super().__call__(*args, **kwargs)


@torch.no_grad()
def test_a_pipeline_that_sets_its_unet_up_inside_its_call_records_and_edits():
    """The PAG pipelines install their attention processors inside their call (and restore
    them at its end), after fc.recording began: the recording takes the U-Net of its first
    call (it was refused as a U-Net changed since compiled, and the refusal skipped PAG's
    restore). The edit meets the oracle at every call and keeps the recording outside."""
    from diffusers import StableDiffusionPAGPipeline

    base = zoo.pipeline("sd15-tiny")
    pipe = StableDiffusionPAGPipeline(**base.components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = torch.compile(pipe.unet, backend="fisedit")
    run = dict(num_inference_steps=3, height=128, width=128, output_type="latent",
               pag_scale=3.0)
    with fc.recording(pipe) as rec:
        pipe("a cat", generator=torch.Generator().manual_seed(0), **run)
    mask = box((16, 16), 3, 5, 9, 11)
    with fc.editing(rec, mask) as ed:
        pipe("a dog", generator=torch.Generator().manual_seed(0), **run)
    assert rec.num_steps == 3 and ed.steps == [0, 1, 2]
    outside = ~ed.plan[0].active
    for k in range(3):
        expected = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[k], ed.inputs[k])
        assert relative_error(ed.outputs[k], expected) <= TOLERANCE
        assert torch.equal(ed.outputs[k][..., outside], rec.outputs[k][..., outside])


@torch.no_grad()
def test_a_unet_changed_after_a_recordings_first_call_is_refused_before_it_is_not():
    """The recording takes the U-Net of its first call; a change Dynamo does not see (a
    weight's storage swapped through .data) between its calls is refused by that snapshot. A
    first call that failed recorded nothing, so the call after it starts the recording."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit")
    inputs, t = zoo.example_inputs(unet), torch.tensor(500)
    with fc.recording(compiled) as rec:
        call(compiled, inputs, t)
        weight = unet.conv_in.weight
        weight.data = weight.data.clone()
        with pytest.raises(fc.FiseditError, match=r"changed since it was compiled.*storage of "
                                                  r"weight\(s\) conv_in.weight was replaced"):
            call(compiled, inputs, torch.tensor(400))
    assert rec.num_steps == 1
    nan = dict(inputs, sample=torch.full_like(inputs["sample"], float("nan")))
    with fc.recording(compiled) as retried:
        with pytest.raises(fc.FiseditError, match="NaN"):
            call(compiled, nan, t)
        weight.data = weight.data.clone()         # between the failed call and the next
        call(compiled, inputs, t)
        call(compiled, inputs, torch.tensor(400))
    assert retried.num_steps == 2


class StoringProcessor(AttnProcessor2_0):
    """Diffusers' attention that keeps its output on itself, as self-attention guidance's
    processor keeps its maps: Dynamo hands the stored tensor back as a second output."""

    def __call__(self, *args, **kwargs):
        self.stored = super().__call__(*args, **kwargs)
        return self.stored


@torch.no_grad()
def test_a_call_that_stores_python_state_is_not_called_a_graph_break_alone():
    unet = zoo.unet("sd15-tiny")
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(StoringProcessor())
    compiled = torch.compile(unet, backend="fisedit", fullgraph=True)
    inputs, t = zoo.example_inputs(unet), torch.tensor(500)
    with pytest.warns(UnsupportedGraphWarning, match=r"returns 2 values, not one sample: "
                                                     r"either a graph break.*or the call "
                                                     r"writes Python state.*fuse_lora"):
        assert torch.equal(call(compiled, inputs, t), call(unet, inputs, t))


@torch.no_grad()
def test_graph_break_falls_back_to_dense():
    unet = zoo.unet("sd15-tiny")
    # (A processor class, not a hook: Dynamo does not guard on hooks, so a hook added to a
    # second instance of a compiled architecture is silently ignored.)
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(GraphBreakProcessor())
    compiled = torch.compile(unet, backend="fisedit")
    inputs, t = zoo.example_inputs(unet), torch.tensor(500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(call(compiled, inputs, t), call(unet, inputs, t))
    assert any("graph break" in message for message in _unsupported(caught)), caught

    with pytest.warns(UnsupportedGraphWarning, match="holds no U-Net call"):
        with fc.recording(compiled) as rec:
            assert torch.equal(call(compiled, inputs, t), call(unet, inputs, t))
    assert rec.num_steps == 0 and any("graph break" in reason for reason in rec.fallbacks)
    with pytest.raises(fc.FiseditError, match="graph break"):
        with fc.editing(rec, torch.zeros(16, 16, dtype=torch.bool)):
            pass


class _Branching(torch.nn.Module):
    """A block wrapped with Python control flow on a tensor's value: Dynamo breaks the graph
    there and compiles the blocks around it as graphs of their own."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        return out * 2 if out.mean() > 0 else out


class _Noisy(_Branching):
    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        return out + 0.1 * torch.randn_like(out)


@torch.no_grad()
def test_a_graph_break_in_a_block_is_named_when_nothing_was_recorded(fresh_dynamo):
    unet = zoo.unet("sd15-tiny")
    unet.mid_block.resnets[0] = _Branching(unet.mid_block.resnets[0])
    compiled = torch.compile(unet, backend="fisedit")
    inputs, t = zoo.example_inputs(unet), torch.tensor(500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedGraphWarning)
        with fc.recording(compiled) as rec:
            assert torch.equal(call(compiled, inputs, t), call(unet, inputs, t))
    with pytest.raises(fc.FiseditError, match="holds no U-Net call.*a graph break split the "
                                              "U-Net call.*fullgraph=True"):
        rec.program


@torch.no_grad()
def test_an_input_diffusers_would_drop_is_refused_though_dynamo_drops_it_too(fresh_dynamo):
    """A mid-block residual without the down-block ones is ignored by diffusers, so the graph
    Dynamo hands over has no input for it: the backend reads the call's arguments instead."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit")
    inputs = dict(zoo.example_inputs(unet), mid_block_additional_residual=torch.randn(2, 64, 4, 4))
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(**inputs)
    assert isinstance(info.value.inner_exception, fc.FiseditError)
    assert re.search("mid_block_additional_residual was given without "
                     "down_block_additional_residuals", str(info.value.inner_exception))
    # SDXL's added conditions: a key its config does not read is dropped by diffusers.
    torch._dynamo.reset()
    sdxl = zoo.unet("sdxl-tiny")
    stray = zoo.example_inputs(sdxl)
    stray["added_cond_kwargs"] = dict(stray["added_cond_kwargs"], time_id=torch.zeros(2, 6))
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(sdxl, backend="fisedit")(**stray)
    assert re.search("added_cond_kwargs has key.*'time_id'.*does not read",
                     str(info.value.inner_exception))


@torch.no_grad()
def test_a_frame_resumed_after_a_graph_break_is_not_read_as_the_call(fresh_dynamo):
    """Past a graph break Dynamo compiles a resumed frame holding only the live variables: a
    ControlNet call's down residuals are spent by then, its mid residual not, which is no
    call of diffusers' that drops an input. The call runs, dense."""
    import diffusers

    torch.manual_seed(0)
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet)
    controlnet = diffusers.ControlNetModel.from_unet(unet).eval()
    image = torch.randn(2, 3, *(8 * side for side in inputs["sample"].shape[2:]))
    down, mid = controlnet(inputs["sample"], inputs["timestep"],
                           inputs["encoder_hidden_states"], controlnet_cond=image,
                           return_dict=False)
    call = dict(inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    unet.mid_block.resnets[1] = _Branching(unet.mid_block.resnets[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedGraphWarning)
        assert torch.equal(torch.compile(unet, backend="fisedit")(**call)[0], unet(**call)[0])


@torch.no_grad()
def test_a_unet_that_draws_random_numbers_runs_dense_and_is_not_recorded(fresh_dynamo):
    unet = zoo.unet("sd15-tiny")
    unet.mid_block.resnets[0] = _Noisy(unet.mid_block.resnets[0])
    compiled = torch.compile(unet, backend="fisedit", fullgraph=True)
    inputs, t = zoo.example_inputs(unet), torch.tensor(500)
    with pytest.warns(UnsupportedGraphWarning, match=r"draws random numbers \(aten.randn_like"):
        with fc.recording(compiled) as rec:
            call(compiled, inputs, t)
    assert rec.num_steps == 0


@torch.no_grad()
def test_an_int_timestep_baked_in_by_dynamo_is_named_with_its_fix():
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit")
    inputs = zoo.example_inputs(unet)
    with pytest.warns(UnsupportedGraphWarning, match=r"no 'timestep' input.*torch.tensor\(t\)"):
        assert torch.equal(call(compiled, inputs, 500), call(unet, inputs, 500))
    with pytest.warns(UnsupportedGraphWarning, match="holds no U-Net call"):
        with fc.recording(compiled) as rec:
            call(compiled, inputs, 500)
    assert any("timestep" in reason for reason in rec.fallbacks)


@torch.no_grad()
def test_float_timesteps_of_a_loop_are_named_with_the_same_fix(fresh_dynamo):
    """A float that changed between calls is an input of Dynamo's next graph: named as the
    timestep, with its fix, not as a processor setting."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit")
    inputs = zoo.example_inputs(unet)
    with pytest.warns(UnsupportedGraphWarning, match="no 'timestep' input"):
        call(compiled, inputs, 500.0)
    with pytest.warns(UnsupportedGraphWarning, match=r"takes the timestep as a Python number.*"
                                                     r"torch.tensor\(t\)"):
        assert torch.equal(call(compiled, inputs, 400.0), call(unet, inputs, 400.0))


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


def test_strict_raises_and_default_falls_back():
    x = torch.randn(1, 3, 8, 8)
    model = TwoOutputs()
    with pytest.warns(UnsupportedGraphWarning, match="not a diffusers U-Net"):
        y, m = torch.compile(model, backend="fisedit")(x)
    assert torch.equal(y, model(x)[0])
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(TwoOutputs(), backend="fisedit", options={"strict": True})(x)
    assert isinstance(info.value.inner_exception, fc.UnsupportedGraphError)
    assert "not a diffusers U-Net" in str(info.value)
    assert fc.UnsupportedGraphWarning is UnsupportedGraphWarning      # the README's name
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(TwoOutputs(), backend="fisedit", options={"strcit": True})(x)
    assert isinstance(info.value.inner_exception, fc.FiseditError)
    assert "strcit" in str(info.value)


@torch.no_grad()
def test_resolution_change(sd15):
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    with fc.recording(compiled) as rec16:
        call(compiled, inputs, t)
    big = zoo.example_inputs(unet, batch=2, seed=2, height=24, width=24)
    # Dynamo recompiles (with dynamic sizes); dense calls stay exact...
    assert torch.equal(call(compiled, big, t), call(unet, big, t))
    # ... recording specializes a program to 24x24, whose edits meet the oracle ...
    with fc.recording(compiled) as rec24:
        call(compiled, big, t)
    assert rec24.latent_size == (24, 24)
    mask = box((24, 24), 2, 10, 7, 20)
    with fc.editing(rec24, mask) as ed:
        out = call(compiled, edited(big, mask), t)
    ref = fc.oracle.masked_dense(rec24.engine, ed.plan, rec24.inputs[0], ed.inputs[0])
    assert relative_error(out, ref) <= TOLERANCE
    # ... and a recording refuses another resolution, with the reason.
    with pytest.raises(fc.FiseditError, match=r"sample is \[2, 4, 24, 24\] float32 on cpu where "
                                              r"the recording has \[2, 4, 16, 16\]"):
        with fc.editing(rec16, torch.ones(16, 16, dtype=torch.bool)):
            call(compiled, big, t)
    with pytest.raises(fc.FiseditError, match="latent is 16x16"):
        with fc.editing(rec16, mask):
            pass


def test_fresh_interpreter(fresh_interpreter):
    """Registration through the entry point, and every tiny zoo U-Net through the backend:
    dense equals eager; record, then edit against the oracle; an empty mask gives the record."""
    out, err = fresh_interpreter.communicate(timeout=600)
    assert fresh_interpreter.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["listed"] and not result["imported_first"]
    assert sorted(result["models"]) == sorted(TINY)
    for name, row in result["models"].items():
        assert row["dense_max_abs"] == 0, name
        assert row["record_rel"] <= TOLERANCE, name
        assert row["edit_oracle_rel"] <= TOLERANCE, name
        assert row["empty_equal"], name
        assert not row["unsupported"], (name, row["unsupported"])


def test_registers_on_import_without_entry_point(monkeypatch):
    """From a source checkout (no installed entry point) importing the package registers it."""
    import importlib.metadata

    from torch._dynamo.backends import registry

    from fisedit_compiler import backend

    monkeypatch.setattr(registry, "_COMPILER_FNS", {})
    monkeypatch.setattr(registry, "_BACKENDS", {})
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    backend._register()
    assert registry._COMPILER_FNS["fisedit"] is fisedit_backend
    backend._register()                       # again (a reload): no duplicate-name error


# Issue 18: nothing the backend cannot honour passes silently.

@pytest.mark.parametrize("model, x", [(torch.nn.Conv2d(3, 3, 3, padding=1), torch.randn(1, 3, 8, 8)),
                                      (torch.nn.Linear(4, 4), torch.randn(2, 4))])
def test_a_module_that_is_not_a_unet_warns(model, x):
    with pytest.warns(UnsupportedGraphWarning, match=f"fisedit: {type(model).__name__} is not "
                                                     "a diffusers U-Net"):
        assert torch.equal(torch.compile(model, backend="fisedit")(x), model(x))


@torch.no_grad()
def test_an_editing_context_that_edits_nothing_warns(sd15):
    """The pipeline holds the plain U-Net: its calls never reach the backend."""
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    with fc.recording(compiled) as rec:
        call(compiled, inputs, t)
    with pytest.warns(UnsupportedGraphWarning, match="no U-Net call was edited"):
        with fc.editing(rec, box((16, 16), 0, 0, 4, 4)):
            call(unet, inputs, t)


@torch.no_grad()
def test_calls_from_another_thread_are_refused_or_run_in_a_copied_context(sd15):
    import contextvars
    import threading

    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    outcome = {}

    def in_thread():
        try:
            with torch.no_grad():
                call(compiled, inputs, t)
            outcome["result"] = "ran"
        except fc.FiseditError as error:
            outcome["result"] = str(error)

    with fc.recording(compiled) as rec:
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert "being recorded in another thread" in outcome["result"]
        thread = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
        thread.start()
        thread.join()
    assert outcome["result"] == "ran" and rec.num_steps == 1       # recorded, from the thread
    in_thread()                                                    # no context open: dense
    assert outcome["result"] == "ran"


# A Python-level setting of the U-Net changed during a recording or between record and edit:
# Dynamo recompiles into a graph of the same inputs; the recording must not run its old program.

@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset: these tests recompile one U-Net class several times, and a test
    must not reach Dynamo's recompile limit (past it, calls run eagerly, never reaching us)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ScaledProcessor(AttnProcessor2_0):
    """Diffusers' attention scaled by ``scale`` (an attribute, as IP-Adapter and PEFT LoRA
    scales are: Dynamo bakes its value in) and by ``gain`` from cross_attention_kwargs."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, gain=1.0):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out * (self.scale * gain)


def scaled_unet():
    unet = zoo.unet("sd15-tiny")
    processor = ScaledProcessor(0.5)
    unet.set_attn_processor(processor)
    return unet, processor, zoo.example_inputs(unet, batch=2, seed=0)


def freeu_on(unet, processor):
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


def scale_zero(unet, processor):        # what diffusers' IPAdapterScaleCutoffCallback does
    processor.scale = 0.0


def scale_back(unet, processor):
    processor.scale = 0.5


def graph_break(unet, processor):
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(GraphBreakProcessor())


def state_of(rec):
    return (rec.num_steps, rec.cache.num_steps, len(rec.inputs), len(rec.outputs),
            [output.clone() for output in rec.outputs])


def assert_same_state(before, rec):
    after = state_of(rec)
    assert after[:4] == before[:4]
    assert all(torch.equal(a, b) for a, b in zip(after[4], before[4]))


# specialize_float=True: Dynamo compiles one graph per value of a Python float; by default it
# makes the float an input of its next graph once the value changed, which a recording refuses.
def specialize_floats(request, value: bool) -> None:
    patch = torch._dynamo.config.patch(specialize_float=value)
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))


ANOTHER_GRAPH = "Dynamo compiled another U-Net graph"


@pytest.mark.parametrize("change, specialize, match", [
    (freeu_on, False, ANOTHER_GRAPH),
    (scale_zero, True, ANOTHER_GRAPH),
    (scale_zero, False, ANOTHER_GRAPH),
    (graph_break, False, "cannot be recorded.*graph break")],
    ids=["freeu", "ip-adapter-scale", "ip-adapter-scale-as-input", "graph-break"])
@torch.no_grad()
def test_a_setting_changed_during_a_recording_is_refused(fresh_dynamo, request, change,
                                                         specialize, match):
    specialize_floats(request, specialize)
    unet, processor, inputs = scaled_unet()
    compiled = torch.compile(unet, backend="fisedit")
    t = torch.tensor(500)
    with pytest.raises(fc.FiseditError, match="during the recording") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsupportedGraphWarning)
            with fc.recording(compiled) as rec:
                first = call(compiled, inputs, t)
                before = state_of(rec)
                change(unet, processor)
                call(compiled, inputs, torch.tensor(400))    # the pipeline's second step
    assert re.search(match, str(info.value)) and "record it again" in str(info.value)
    assert_same_state(before, rec)                     # the refused call added nothing
    assert torch.equal(rec.outputs[0], first)


# (disable_freeu leaves its attributes set, to None: the engine refuses that U-Net as changed.)
@pytest.mark.parametrize("change, undo, specialize, match", [
    (freeu_on, None, False, ANOTHER_GRAPH),
    (scale_zero, scale_back, True, ANOTHER_GRAPH),
    (scale_zero, scale_back, False, ANOTHER_GRAPH)],
    ids=["freeu", "ip-adapter-scale", "ip-adapter-scale-as-input"])
@torch.no_grad()
def test_a_setting_changed_between_record_and_edit_is_refused(fresh_dynamo, request, change,
                                                             undo, specialize, match):
    specialize_floats(request, specialize)
    unet, processor, inputs = scaled_unet()
    compiled = torch.compile(unet, backend="fisedit")
    t = torch.tensor(500)
    with fc.recording(compiled) as rec:
        recorded = call(compiled, inputs, t)
    before = state_of(rec)
    mask = torch.ones(16, 16, dtype=torch.bool)        # a full mask: the edit is the dense U-Net
    change(unet, processor)
    with pytest.raises(fc.FiseditError, match="changed between record and edit.*record the "
                                              "generation again") as info:
        with fc.editing(rec, mask) as ed:
            call(compiled, inputs, t)
    assert re.search(match, str(info.value))
    assert ed.steps == [] and ed.outputs == []
    assert_same_state(before, rec)
    if undo is None:
        return
    undo(unet, processor)                               # the recorded setting again
    # (Without specialize_float Dynamo's graph takes the scale as an input now: at the recorded
    # value it lowers to the recorded program, which it then edits.)
    new = edited(inputs, mask)
    with fc.editing(rec, mask) as ed:
        out = call(compiled, new, t)
    assert ed.steps == [0]
    assert relative_error(out, call(unet, new, t)) <= TOLERANCE
    with pytest.warns(UserWarning, match="marks no latent pixel"), \
            fc.editing(rec, torch.zeros(16, 16, dtype=torch.bool)):
        assert torch.equal(call(compiled, inputs, t), recorded)


def at_gain(compiled, inputs, t):
    """``at(gain)``: ``compiled`` called on ``inputs`` at ``t`` with cross_attention_kwargs
    {"gain": gain} (scaled_unet's processor reads it)."""
    def at(gain):
        return compiled(inputs["sample"], t, encoder_hidden_states=inputs["encoder_hidden_states"],
                        cross_attention_kwargs={"gain": gain}, return_dict=False)[0]
    return at


@torch.no_grad()
def test_a_cross_attention_kwargs_value_changed_since_recording_is_refused(fresh_dynamo):
    """A number in cross_attention_kwargs (a LoRA scale) is baked into the graph; once it
    changes, Dynamo makes it an input of a new graph. Neither may run the recorded value. A
    recording made with that graph keeps the number's value as a constant of its program,
    and its edits must pass the same value."""
    unet, processor, inputs = scaled_unet()
    compiled = torch.compile(unet, backend="fisedit")
    t = torch.tensor(500)
    at = at_gain(compiled, inputs, t)

    with fc.recording(compiled) as rec:
        recorded = at(0.5)
    before = state_of(rec)
    mask = torch.ones(16, 16, dtype=torch.bool)
    with pytest.raises(fc.FiseditError, match=ANOTHER_GRAPH):
        with fc.editing(rec, mask) as ed:
            at(1.0)             # from here on Dynamo's graph takes the gain as an input
    assert ed.steps == []
    assert_same_state(before, rec)
    with fc.editing(rec, mask) as ed:       # at the recorded gain, the recorded program
        assert relative_error(at(0.5), recorded) <= TOLERANCE
    assert ed.steps == [0]
    # A recording with the graph that takes the gain: the value is its program's constant.
    with fc.recording(compiled) as again:
        out = at(1.0)
    assert relative_error(out, unet(inputs["sample"], t,
                                    encoder_hidden_states=inputs["encoder_hidden_states"],
                                    cross_attention_kwargs={"gain": 1.0})[0]) <= TOLERANCE
    with fc.editing(again, mask):
        assert relative_error(at(1.0), out) <= TOLERANCE
    kept = state_of(again)
    with pytest.raises(fc.FiseditError, match=r"a Python number its graph takes changed "
                                              r"\(cross_attention_kwargs_gain was 1.0 and is "
                                              r"0.7\)"):
        with fc.editing(again, mask) as ed:
            at(0.7)
    assert ed.steps == []
    assert_same_state(kept, again)
    # A recording at another value: the graph's cache keeps the latest values' program only
    # (one per value would keep its derived weight copies too); each recording has its own.
    with fc.recording(compiled) as third:
        at(0.7)
    (graph,) = [g for g in fc.backend.compiled_graphs(unet) if g.number_names]
    assert graph.programs_built == 1
    with fc.editing(again, mask):
        assert relative_error(at(1.0), out) <= TOLERANCE
    assert third.num_steps == 1


@torch.no_grad()
def test_an_int_number_input_is_a_constant_of_the_recording(fresh_dynamo):
    """Under dynamic=True an int of cross_attention_kwargs is a symbolic int of the graph,
    which the lowering specializes: a recording and its edits keep its value."""
    unet, processor, inputs = scaled_unet()
    compiled = torch.compile(unet, backend="fisedit", dynamic=True)
    t, mask = torch.tensor(500), torch.ones(16, 16, dtype=torch.bool)
    at = at_gain(compiled, inputs, t)

    with fc.recording(compiled) as rec:
        recorded = at(3)
        with pytest.raises(fc.FiseditError, match=r"earlier calls: a Python number its graph "
                                                  r"takes changed \(cross_attention_kwargs_"
                                                  r"gain was 3 and is 4\)"):
            at(4)
    assert rec.num_steps == 1
    with fc.editing(rec, mask):
        assert relative_error(at(3), recorded) <= TOLERANCE
    with pytest.raises(fc.FiseditError, match="cross_attention_kwargs_gain was 3 and is 4"):
        with fc.editing(rec, mask):
            at(4)


@torch.no_grad()
def test_dynamic_true_records_and_edits_with_its_floats_as_constants(fresh_dynamo):
    """Under dynamic=True Dynamo makes every float of the modules (norm eps, scales) a graph
    input from the first call: each program holds the recorded values as constants."""
    unet = zoo.unet("sd15-tiny")
    inputs, t = zoo.example_inputs(unet, batch=2, seed=0), torch.tensor(500)
    compiled = torch.compile(unet, backend="fisedit", dynamic=True)
    with fc.recording(compiled) as rec:
        recorded = call(compiled, inputs, t)
    (graph,) = fc.backend.compiled_graphs(unet)
    assert graph.number_names and rec.num_steps == 1
    assert relative_error(recorded, call(unet, inputs, t)) <= TOLERANCE
    mask = box((16, 16), 3, 5, 9, 10)
    with fc.editing(rec, mask) as ed:
        result = call(compiled, edited(inputs, mask), t)
    outside = ~ed.plan[0].active
    assert torch.equal(result[..., outside], recorded[..., outside])
    ref = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[0], ed.inputs[0])
    assert relative_error(result, ref) <= TOLERANCE


@torch.no_grad()
def test_another_graph_of_the_same_unet_edits_the_recording(fresh_dynamo):
    """Dynamo recompiles without a change to the U-Net too (another compiled wrapper, a graph
    with dynamic sizes after a resolution change): those graphs edit the recording as its own."""
    unet = zoo.unet("sd15-tiny")
    inputs, t = zoo.example_inputs(unet, batch=2, seed=0), torch.tensor(500)
    big = zoo.example_inputs(unet, batch=2, seed=2, height=24, width=24)
    dynamic = torch.compile(unet, backend="fisedit")
    call(dynamic, big, t)                            # 24x24 first: 16x16 then runs dynamic
    with fc.recording(dynamic) as rec:
        call(dynamic, inputs, t)
    (graph,) = [g for g in fc.backend.compiled_graphs(unet) if g.dynamic]
    assert graph.programs_built == 1
    mask = box((16, 16), 3, 5, 9, 10)
    new = edited(inputs, mask)
    with fc.editing(rec, mask) as ed:
        expected = call(dynamic, new, t)
    known = set(fc.backend.compiled_graphs(unet))
    static = torch.compile(unet, backend="fisedit", dynamic=False)
    with fc.editing(rec, mask) as ed:
        assert torch.equal(call(static, new, t), expected)
    (other,) = set(fc.backend.compiled_graphs(unet)) - known
    assert not other.dynamic
    assert other.programs_built == 0                 # compared, never built into a program
    ref = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[0], ed.inputs[0])
    assert relative_error(expected, ref) <= TOLERANCE


@torch.no_grad()
def test_a_failed_recorded_call_leaves_the_recording_as_it_was(sd15):
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    weight = unet.conv_in.bias
    with pytest.raises(fc.FiseditError, match="weights"):
        with fc.recording(compiled) as rec:
            call(compiled, inputs, t)
            before = state_of(rec)
            weight.add_(0)                               # an in-place change (a LoRA fused)
            call(compiled, inputs, torch.tensor(400))
    assert_same_state(before, rec)


@torch.no_grad()
def test_an_edit_call_that_fails_copying_its_result_is_not_counted(sd15, monkeypatch):
    """Out of memory while the editing context copies a call's inputs and output: the call
    raises, the context has not counted it, and the pipeline's retry edits the same step."""
    from fisedit_compiler import backend

    unet, compiled, inputs = sd15
    timesteps = [torch.tensor(900), torch.tensor(800)]
    with fc.recording(compiled) as rec:
        for t in timesteps:
            call(compiled, inputs, t)
    mask = box((16, 16), 4, 4, 8, 8)
    new = edited(inputs, mask)
    with fc.editing(rec, mask) as ed:
        first = call(compiled, new, timesteps[0])
        with monkeypatch.context() as patch:
            def out_of_memory(flat):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            patch.setattr(backend, "_kept", out_of_memory)
            with pytest.raises(torch.OutOfMemoryError):
                call(compiled, new, timesteps[1])
        assert ed.steps == [0] and len(ed.inputs) == len(ed.outputs) == 1
        second = call(compiled, new, timesteps[1])
    assert ed.steps == [0, 1] and torch.equal(ed.outputs[0], first)
    assert torch.equal(ed.outputs[1], second)


@torch.no_grad()
def test_a_recorded_call_that_fails_copying_its_inputs_changes_nothing(sd15, monkeypatch):
    from fisedit_compiler import backend

    unet, compiled, inputs = sd15
    with fc.recording(compiled) as rec:
        call(compiled, inputs, torch.tensor(900))
        before = state_of(rec)
        with monkeypatch.context() as patch:
            def out_of_memory(flat):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            patch.setattr(backend, "_kept", out_of_memory)
            with pytest.raises(torch.OutOfMemoryError):
                call(compiled, inputs, torch.tensor(800))
        assert_same_state(before, rec)
        assert sorted(rec.cache.steps) == [0]
        call(compiled, inputs, torch.tensor(800))      # the pipeline's retry
    assert rec.num_steps == 2 and len(rec.inputs) == len(rec.outputs) == 2


@torch.no_grad()
def test_an_edit_without_the_recorded_controlnet_residuals_is_refused_naming_them(sd15):
    unet, compiled, inputs = sd15
    t = torch.tensor(500)
    residuals = [torch.randn(2, c, s, s) for c, s in ((32, 16), (32, 16), (32, 8), (64, 8),
                                                      (64, 8))]
    with fc.recording(compiled) as rec:
        compiled(inputs["sample"], t, encoder_hidden_states=inputs["encoder_hidden_states"],
                 down_block_additional_residuals=residuals,
                 mid_block_additional_residual=torch.randn(2, 64, 8, 8), return_dict=False)
    before = state_of(rec)
    with pytest.raises(fc.FiseditError, match=r"the call drops down_block_additional_residuals_0"
                                              r".*\(an argument such as ControlNet residuals"):
        with fc.editing(rec, box((16, 16), 4, 4, 8, 8)):
            call(compiled, inputs, t)
    assert_same_state(before, rec)


def test_autocast_and_inputs_that_require_grad_are_refused_and_the_recording_kept(sd15):
    """The engine computes in the U-Net's dtype without autograd: under torch.autocast a
    recording and its edits would mix precisions, and a gradient would be silently lost."""
    unet, compiled, inputs = sd15
    t, mask = torch.tensor(500), box((16, 16), 0, 0, 4, 8)
    with torch.no_grad(), fc.recording(compiled) as rec:
        call(compiled, inputs, t)
    before = state_of(rec)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(fc.FiseditError, match="torch.autocast is on for cpu"):
            with fc.recording(compiled):
                call(compiled, inputs, t)
        with pytest.raises(fc.FiseditError, match="torch.autocast is on for cpu"):
            with fc.editing(rec, mask):
                call(compiled, inputs, t)
    needs_grad = dict(inputs, sample=inputs["sample"].clone().requires_grad_())
    with pytest.raises(fc.FiseditError, match=r"sample.* require grad, but the engine computes "
                                              r"without autograd"):
        with fc.editing(rec, mask):
            call(compiled, needs_grad, t)
    assert_same_state(before, rec)
    with torch.no_grad(), fc.editing(rec, mask) as ed:
        out = call(compiled, edited(inputs, mask), t)
    ref = fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[0], ed.inputs[0])
    assert relative_error(out, ref) <= TOLERANCE


@pytest.mark.parametrize("options, match", [({"strict": "no"}, "strict must be True or False"),
                                            ({"strict": 1}, "strict must be True or False"),
                                            ("strict", "options must be a dict"),
                                            ({"strcit": True}, "unknown .*'strcit'")])
def test_backend_options_are_checked(options, match):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(TwoOutputs(), backend="fisedit", options=options)(x)
    assert isinstance(info.value.inner_exception, fc.FiseditError)
    assert re.search(match, str(info.value.inner_exception))


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
def test_backend_refuses_compile_modes(mode):
    # An Inductor mode has no meaning for this backend: refused, not dropped with a warning.
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(TwoOutputs(), backend="fisedit", mode=mode)(x)
    assert isinstance(info.value.inner_exception, fc.FiseditError)
    assert re.search("no compile modes.*leave mode out", str(info.value.inner_exception))


@torch.no_grad()
def test_a_recording_made_with_other_weights_does_not_change_anothers_edits(fresh_dynamo):
    """Recordings of one compiled graph share its program and so its derived weight copies:
    recording B, made after a write through param.data (an EMA swap), refreshed them for its
    weights, and recording A's edit, after the weights were written back, read them (0.07 off,
    no error). The copies now carry what they were made from."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    t, mask = torch.tensor(500), box((16, 16), 3, 5, 9, 11)
    edited = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"] + 0.1)
    with fc.recording(compiled) as first:
        call(compiled, inputs, t)
    with fc.editing(first, mask):
        expected = call(compiled, edited, t)
    saved = [p.detach().clone() for p in unet.parameters()]
    for p in unet.parameters():
        p.data.add_(0.05)                       # through .data: no version counter moves
    with fc.recording(compiled) as second:
        call(compiled, inputs, t)
    for p, value in zip(unet.parameters(), saved):
        p.data.copy_(value)                     # written back, bit for bit
    with fc.editing(first, mask):
        assert torch.equal(call(compiled, edited, t), expected)
    assert next(iter(first.engine._programs.values())) is \
        next(iter(second.engine._programs.values()))      # the shared program of the premise


@torch.no_grad()
def test_each_editing_context_starts_an_edit_pass(fresh_dynamo):
    """A context that picks up at the step after the last context's, with the same mask (the
    engine's same plan), continued its pass: it skipped the pass's full U-Net check, and a
    write through param.data between the two went unseen (the edit mixed the weights)."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    timesteps, mask = [torch.tensor(900), torch.tensor(600)], box((16, 16), 3, 5, 9, 11)
    with fc.recording(compiled) as rec:
        for t in timesteps:
            call(compiled, inputs, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the first context stops early: warned
        with fc.editing(rec, mask):
            call(compiled, inputs, timesteps[0])
    unet.conv_in.weight.data.mul_(2.0)
    with pytest.raises(fc.FiseditError, match="written after this generation was recorded, "
                                              "through param.data"):
        with fc.editing(rec, mask, start_step=1):
            call(compiled, inputs, timesteps[1])


@torch.no_grad()
def test_a_whole_run_edited_from_a_later_start_step_is_named_so(sd15):
    """start_step is for a run that begins at a later recorded step; a whole run passed it
    was refused for its timestep alone, naming the scheduler and step count."""
    unet, compiled, inputs = sd15
    timesteps = [torch.tensor(t) for t in (700, 400, 100)]
    with fc.recording(compiled) as rec:
        for t in timesteps:
            call(compiled, inputs, t)
    mask = box((16, 16), 0, 0, 4, 4)
    with pytest.raises(fc.FiseditError, match=r"timestep of the recording's step 0, but "
                                              r"fc.editing\(..., start_step=2\).*leave "
                                              r"start_step at 0"):
        with fc.editing(rec, mask, start_step=2):
            call(compiled, inputs, timesteps[0])
    with fc.editing(rec, mask, start_step=2) as ed:       # the run's last step: edited
        call(compiled, inputs, timesteps[2])
    assert ed.steps == [2]


def test_another_unet_called_inside_a_context_is_named_at_its_first_call(fresh_dynamo):
    """pipe.unet replaced after the recording (a reload of its weights): its calls run dense,
    a regeneration rather than an edit; said at the first call, not only after the run."""
    pipe = zoo.pipeline("sd15-tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = torch.compile(pipe.unet, backend="fisedit")
    with fc.recording(pipe) as rec:
        generate(pipe, "a red cat")
    pipe.unet = torch.compile(zoo.unet("sd15-tiny", seed=1), backend="fisedit")
    seen_after_step = []

    def count_warnings(pipeline, step, timestep, kwargs):
        seen_after_step.append(len(_unsupported(caught)))
        return kwargs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fc.editing(rec, box((16, 16), 6, 6, 10, 10)) as ed:
            pipe("a blue cat", num_inference_steps=3, height=128, width=128,
                 output_type="latent", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=count_warnings)
    assert seen_after_step[0] >= 1 and ed.steps == []
    assert "UNet2DConditionModel that is not the one this fc.editing context is for" in \
        _unsupported(caught)[0]


def test_a_unet_compiled_twice_or_through_its_forward_is_named_so(fresh_dynamo):
    """Both compile the U-Net in a way fc.recording cannot follow; the messages said "not a
    diffusers U-Net" (for a pipeline) and "not compiled"."""
    twice = torch.compile(torch.compile(zoo.unet("sd15-tiny"), backend="fisedit"),
                          backend="fisedit")
    with pytest.raises(fc.FiseditError, match="torch.compile was applied to an already "
                                              "compiled U-Net"):
        with fc.recording(SimpleNamespace(unet=twice)):
            pass
    unet = zoo.unet("sd15-tiny")
    unet.forward = torch.compile(unet.forward, backend="fisedit")
    with pytest.raises(fc.FiseditError, match=r"forward was compiled .* del pipe.unet.forward"):
        with fc.recording(unet):
            pass


@torch.no_grad()
def test_an_editing_context_past_the_recompile_limit_names_the_limit(fresh_dynamo):
    """Past Dynamo's recompile limit a call at a new size runs eagerly, never reaching the
    backend: the context's warning names the limit, not only a pipeline holding the wrong U-Net."""
    unet = zoo.unet("sd15-tiny")
    compiled = torch.compile(unet, backend="fisedit", dynamic=False)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    t = torch.tensor(500)
    with fc.recording(compiled) as rec:
        call(compiled, inputs, t)
    generator = torch.Generator().manual_seed(2)
    larger = dict(inputs, sample=torch.randn(2, 4, 24, 24, generator=generator))
    # (Dynamo's config patch, not monkeypatch: its undo would delete the config entry.)
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(UnsupportedGraphWarning,
                          match=r"no U-Net call was edited.*recompile_limit"):
            with fc.editing(rec, box((16, 16), 0, 0, 4, 4)):
                eager = call(compiled, larger, t)
    assert torch.equal(eager, call(unet, larger, t))
