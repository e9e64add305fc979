"""The torch.compile backend "fisedit": record a generation and edit it through a stock pipeline.

    pipe.unet = torch.compile(pipe.unet, backend="fisedit")
    with fc.recording(pipe.unet) as rec:           # dense; records every U-Net call (step)
        image = pipe(prompt, generator=...).images[0]
    with fc.editing(rec, mask):                    # U-Net call i edits recorded step i
        edited = pipe(new_prompt, generator=...).images[0]

(``rec.editing(mask)`` is the same context. The FISEdit flow lives in the package
``fisedit_compiler.edit_flow``, not ``editing``, so that ``fc.editing`` is plainly this function.)

Outside both contexts the compiled U-Net is a plain dense U-Net: the backend returns Dynamo's
own graph code, ``gm.forward``, behind one context-variable read. That is the cheapest correct
path (no lowering, no copies), and it means compiling costs nothing beyond Dynamo's trace until
the first recording: the sparse ``Program`` is built lazily, at the first recorded call of each
(U-Net, input signature, config), by the same path as ``fc.compile``: the Dynamo graph is
lowered to ATen (``compiler.capture.lower_dynamo_graph``), canonicalized, analyzed, then
``compiler.pipeline.build_program`` (sparsify, cache set, record graph). Recording and editing
then run through a ``SparseEngine`` holding those programs, so the backend and the engine API
give the same numbers and the same validation (signature, timesteps, plan levels).

State lives in a context variable read at call time, never in the graph, so entering or leaving
a context does not touch Dynamo's guards or cause recompiles. A graph serves a context only if
its parameters belong to the context's U-Net (Dynamo shares one compiled graph between U-Nets of
the same architecture; parameters are graph inputs), so other compiled modules run dense.

Guards and recompiles: a new resolution makes Dynamo recompile, by default into a graph with
dynamic sizes. Dense calls run it as is; the sparse programs are specialized per concrete
resolution at record time, and a recording refuses edit calls at another resolution.

Graphs the passes cannot handle (a graph break splitting the U-Net, a module that is not a
diffusers U-Net, a pass failure) fall back to ``gm.forward`` with an ``UnsupportedGraphWarning``
and are not recorded. With ``options={"strict": True}`` the backend instead raises
``UnsupportedGraphError``, at compile time (it then also builds the sparse program eagerly, so
pass failures surface there; Dynamo wraps the error in ``BackendCompilerFailed``).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import warnings
import weakref

import torch

from .checks import check_int, check_optional_int
from .compiler.capture import (check_unet, dynamo_input_name, is_module_state,
                               lower_dynamo_graph, warn_if_training)
from .compiler.pipeline import build_program, canonical_graph, describe_signature
from .config import SparseConfig
from .engine.engine import SparseEngine
from .errors import FiseditError, UnsupportedGraphError
from .execution.plan import MaskPlan, validate_mask
from .graph_keys import INPUTS, LEVELS

log = logging.getLogger(__name__)

BACKEND_NAME = "fisedit"
OPTIONS = {"strict": False}


class UnsupportedGraphWarning(UserWarning):
    """A graph the fisedit passes cannot handle runs as a plain dense graph."""


# ---------------------------------------------------------------------------------- backend

def fisedit_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                    mode: str | None = None, **unused):
    """The torch.compile backend: ``torch.compile(unet, backend="fisedit")``.

    Options (``torch.compile(..., options={...})``): ``strict`` (default False): raise
    ``UnsupportedGraphError`` at compile time for a graph the passes cannot handle, instead
    of falling back to the dense graph with a warning.
    """
    opts = dict(OPTIONS)
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise FiseditError(f"unknown fisedit backend option(s) {unknown}; the options are "
                           f"{sorted(OPTIONS)}")
    opts.update(options or {})
    if mode not in (None, "default"):
        warnings.warn(f"the fisedit backend ignores mode={mode!r}", stacklevel=2)
    module, arg_names = _frame_module()
    if module is not None:
        warn_if_training(module)
    graph = FiseditGraph(gm, example_inputs, module=module, arg_names=arg_names,
                         strict=bool(opts["strict"]))
    if graph.problem is not None:
        if graph.strict:
            raise UnsupportedGraphError(graph.problem)
        warnings.warn(f"fisedit: {graph.problem}; this graph runs dense and cannot be "
                      "recorded or edited", UnsupportedGraphWarning, stacklevel=2)
    elif graph.strict:
        # Strict: surface pass failures now rather than at the first recording.
        graph.program(list(example_inputs), SparseConfig(), module)
    if graph.dynamic:
        log.info("fisedit: U-Net graph compiled with dynamic sizes (Dynamo recompiled after a "
                 "shape change); dense calls run it as is, recording specializes a sparse "
                 "program per resolution (torch.compile(..., dynamic=False) recompiles instead)")
    _GRAPHS.add(graph)
    return graph


def _frame_module():
    """The module whose call Dynamo is compiling (``self`` of the frame) and its forward's
    positional parameter names; (None, None) if torch does not tell."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
        module = root.f_locals.get("self")
        if not isinstance(module, torch.nn.Module):
            # torch.compile(module) on some modules (torch.nn's own, e.g. a Conv2d) starts
            # Dynamo in a wrapper frame that holds the module as ``fn``.
            module = root.f_locals.get("fn")
    except Exception:  # noqa: BLE001 - private API; names then fall back to the defaults
        return None, None
    if not isinstance(module, torch.nn.Module):
        return None, None
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return module, None
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return module, names


_GRAPHS: "weakref.WeakSet[FiseditGraph]" = weakref.WeakSet()


def compiled_graphs(unet=None) -> list["FiseditGraph"]:
    """The live graphs the backend has compiled in this process, or those compiled from calls
    of ``unet`` (compiled or not, or a pipeline holding it). For inspection and tests; note
    that Dynamo lets U-Nets of one architecture share a graph."""
    graphs = list(_GRAPHS)
    if unet is None:
        return graphs
    if not isinstance(unet, torch.nn.Module) and hasattr(unet, "unet"):
        unet = unet.unet
    unet = getattr(unet, "_orig_mod", unet)
    return [graph for graph in graphs if graph.module is unet]


class FiseditGraph:
    """What the backend returns for one Dynamo graph: a callable ``(*args) -> tuple``.

    ``input_names`` and ``input_positions`` say which call arguments are the U-Net's tensor
    inputs (the rest are parameters and, for dynamic graphs, sizes); ``problem`` is why the
    graph cannot be recorded (None when it can).
    """

    def __init__(self, gm, example_inputs, *, module=None, arg_names=None, strict=False):
        from torch.fx._lazy_graph_module import _LazyGraphModule

        _LazyGraphModule.force_recompile(gm)  # else gm.forward stays a recompiling trampoline
        self.gm = gm
        self.forward = gm.forward
        self.strict = strict
        self.dynamic = any(isinstance(x, torch.SymInt) for x in example_inputs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.param_positions = [i for i, x in enumerate(example_inputs)
                                if isinstance(x, torch.nn.Parameter)]
        self.input_positions = [i for i, x in enumerate(example_inputs)
                                if isinstance(x, torch.Tensor)
                                and not is_module_state(placeholders[i].name, x)]
        self.input_names = [dynamo_input_name(placeholders[i].name, arg_names)
                            for i in self.input_positions]
        self.arg_names = arg_names
        self.module_type = type(module).__name__ if module is not None else None
        self._module = weakref.ref(module) if module is not None else lambda: None
        self._probe = None if self.param_positions else next(iter(gm.parameters()), None)
        self.problem = _structural_problem(gm, example_inputs, module, self)
        # Per U-Net module, held weakly (the programs hold its parameters, not the module).
        self._built: "weakref.WeakKeyDictionary[torch.nn.Module, _Built]" = \
            weakref.WeakKeyDictionary()

    @property
    def module(self):
        """The module whose call Dynamo compiled into this graph (None if unknown or gone)."""
        return self._module()

    def __repr__(self) -> str:
        state = "dense fallback: " + self.problem if self.problem else "ok"
        return (f"FiseditGraph({self.module_type or '?'}, inputs {self.input_names}"
                f"{', dynamic' if self.dynamic else ''}; {state})")

    # -- call ---------------------------------------------------------------------------------
    def __call__(self, *args):
        states = _ACTIVE.get()
        if not states and not _LIVE:
            return self.forward(*args)        # the fast path: the plain dense graph
        probe = args[self.param_positions[0]] if self.param_positions else self._probe
        for state in states:
            if id(probe) in state.param_ids:
                return state.call(self, args)
        for state in list(_LIVE):
            if id(probe) in state.param_ids:
                # Contexts live in a context variable, which a new thread does not inherit:
                # this call would run dense and be missing from the recording (or the edit).
                raise FiseditError(
                    f"this U-Net is being {state.verb} in another thread, and a call from "
                    "this thread would not be part of it; call the pipeline in the thread "
                    "that entered the context, or run the thread in a copy of its context "
                    "(contextvars.copy_context().run(...))")
        return self.forward(*args)            # another module's graph

    def flat_inputs(self, args) -> dict[str, torch.Tensor]:
        return {name: args[i] for name, i in zip(self.input_names, self.input_positions)}

    @property
    def programs_built(self) -> int:
        """How many sparse programs this graph has built (0 until something is recorded)."""
        return sum(1 for built in self._built.values() for value in built.programs.values()
                   if not isinstance(value, Exception))

    # -- compile ------------------------------------------------------------------------------
    def program(self, args, config: SparseConfig, module):
        """The sparse Program for this call's signature under ``config`` (built on first use).

        Raises UnsupportedGraphError, with the reason, for a graph the passes cannot handle.
        """
        if self.problem is not None:
            raise UnsupportedGraphError(self.problem)
        signature = SparseEngine.signature(self.flat_inputs(args))
        built = self._built.setdefault(module, _Built()) if module is not None else _Built()
        key = (signature, config)
        if key not in built.programs:
            if signature not in built.canonical:
                built.canonical[signature] = self._canonical(args)
            canonical = built.canonical[signature]
            if isinstance(canonical, Exception):
                built.programs[key] = canonical
            else:
                try:
                    built.programs[key] = build_program(signature, canonical, config)
                except Exception as error:  # noqa: BLE001 - a pass failure means "unsupported"
                    built.programs[key] = _unsupported("the fisedit passes failed on this "
                                                       "graph", error)
        result = built.programs[key]
        if isinstance(result, Exception):
            raise result
        return result

    def _canonical(self, args):
        try:
            lowered = lower_dynamo_graph(self.gm, list(args), self.arg_names)
            canonical = canonical_graph(lowered)
        except Exception as error:  # noqa: BLE001 - any failure here means "unsupported"
            return _unsupported("lowering this graph failed", error)
        if canonical.meta[INPUTS] != self.input_names:
            return UnsupportedGraphError(
                f"the lowered graph takes {canonical.meta[INPUTS]} but the compiled call "
                f"passes {self.input_names}")
        if not canonical.meta.get(LEVELS):
            return UnsupportedGraphError("the graph has no spatial levels reached from its "
                                         "'sample' input, so there is nothing to edit sparsely")
        return canonical


class _Built:
    """A graph's compiled state for one U-Net module."""

    def __init__(self):
        self.canonical: dict = {}   # signature -> analyzed canonical graph, or the error
        self.programs: dict = {}    # (signature, config) -> Program, or the error


def _unsupported(what: str, error: Exception) -> UnsupportedGraphError:
    wrapped = UnsupportedGraphError(f"{what} ({type(error).__name__}: {error})")
    wrapped.__cause__ = error
    return wrapped


def _structural_problem(gm, example_inputs, module, graph) -> str | None:
    """Why this graph is not one whole U-Net call (None if it looks like one)."""
    if module is not None:
        try:
            check_unet(module)
        except FiseditError:
            return (f"the graph comes from a {type(module).__name__}, not a diffusers U-Net "
                    "(fisedit compiles UNet2DConditionModel and UNet2DModel)")
    outputs = gm.graph.output_node().args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != 1:
        return (f"the graph returns {len(outputs)} values, not one sample: a graph break "
                "split the U-Net call (torch.compile(..., fullgraph=True) shows where)")
    if module is not None:
        params = inspect.signature(module.forward).parameters
        foreign = [name for name in graph.input_names
                   if name not in params and not any(name.startswith(p + "_") for p in params)]
        if foreign:
            return (f"the graph takes {foreign}, which are not arguments of "
                    f"{type(module).__name__}.forward: it is a piece of a U-Net call split by "
                    "a graph break (torch.compile(..., fullgraph=True) shows where)")
        if "timestep" in params and "timestep" not in graph.input_names:
            return ("the graph has no 'timestep' input: torch.compile made a Python-number "
                    "timestep a constant of the graph (one graph per value); pass the "
                    "timestep as a tensor, torch.tensor(t), as diffusers pipelines do")
    if "sample" not in graph.input_names:
        return f"the graph has no 'sample' input (its inputs are {graph.input_names})"
    sample = example_inputs[graph.input_positions[graph.input_names.index("sample")]]
    value = getattr(outputs[0], "meta", {}).get("example_value")
    channels = getattr(getattr(module, "config", None), "out_channels", None)
    if isinstance(value, torch.Tensor) and sample.dim() == 4 and (
            value.dim() != 4 or value.shape[0] != sample.shape[0]
            or tuple(value.shape[-2:]) != tuple(sample.shape[-2:])
            or (channels is not None and value.shape[1] != channels)):
        return (f"the graph returns a {list(value.shape)} tensor, not the U-Net's output for "
                f"its {list(sample.shape)} sample: a graph break split the U-Net call "
                "(torch.compile(..., fullgraph=True) shows where)")
    return None


# ---------------------------------------------------------------------------- registration

def _register() -> None:
    """Make ``backend="fisedit"`` resolvable when the entry point is not installed.

    With the package installed, torch finds the backend through the ``torch_dynamo_backends``
    entry point and imports this module lazily; registering here as well would make torch's
    registry fail on a duplicate name, so we register only when the entry point is absent
    (e.g. a source checkout on ``sys.path``). That also keeps ``import fisedit_compiler`` from
    importing torch._dynamo.
    """
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="torch_dynamo_backends"):
            if entry.name == BACKEND_NAME and entry.value == f"{__name__}:fisedit_backend":
                return
    except Exception:  # noqa: BLE001 - broken metadata: register directly
        pass
    from torch._dynamo.backends.registry import register_backend

    try:
        register_backend(fisedit_backend, name=BACKEND_NAME)
    except AssertionError:  # already registered (a reload)
        pass


_register()


# ------------------------------------------------------------------------ recording, editing

_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("fisedit_active", default=())
# Every open context in any thread (appends and removes are atomic under the GIL): a compiled
# U-Net called from a thread that does not see a context of its own is refused, not run dense.
_LIVE: list = []


def _resolve_unet(unet):
    """The plain diffusers U-Net behind a compiled one (or a pipeline holding one)."""
    if not isinstance(unet, torch.nn.Module) and hasattr(unet, "unet"):
        unet = unet.unet                                  # a pipeline
    original = getattr(unet, "_orig_mod", None)           # torch.compile(unet)
    if original is None and getattr(unet, "_compiled_call_impl", None) is not None:
        original = unet                                   # unet.compile()
    if original is None:
        check_unet(unet)
        raise FiseditError(
            f"this {type(unet).__name__} is not compiled; compile it with the fisedit backend "
            "first: pipe.unet = torch.compile(pipe.unet, backend=\"fisedit\")")
    check_unet(original)
    return original


class Recording:
    """One recorded generation: the cache of every U-Net call (step) and its inputs.

    ``engine`` is a SparseEngine over the U-Net holding the programs the recording used, so
    ``engine.stats(plan)`` and ``fc.oracle.masked_dense(rec.engine, plan, rec.inputs[i],
    edited_inputs)`` work on it. ``inputs[i]`` are the tensor inputs of step ``i`` (the
    U-Net's argument names, ``added_cond_kwargs`` flattened) and ``outputs[i]`` its output.
    """

    def __init__(self, unet, config: SparseConfig, num_steps: int | None):
        self.unet = unet
        self.config = config
        self.engine = SparseEngine(unet, config)
        self.growable = num_steps is None
        self.cache = self.engine.new_cache(num_steps if num_steps is not None else 1)
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []
        self.fallbacks: list[str] = []

    @property
    def num_steps(self) -> int:
        """How many U-Net calls were recorded."""
        return len(self.cache.steps)

    @property
    def program(self):
        if not self.cache.steps:
            raise FiseditError(self._nothing_recorded())
        return self.engine.program(self.inputs[0])

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.program.levels[0])

    def editing(self, mask, *, start_step: int = 0):
        """``with rec.editing(mask): pipe(...)``, the same as ``fc.editing(rec, mask)``."""
        return editing(self, mask, start_step=start_step)

    def plan(self, mask) -> MaskPlan:
        """The mask plan of a bool ``[H, W]`` mask at this recording's latent resolution."""
        levels = self.program.levels
        if isinstance(mask, MaskPlan):
            if [tuple(s) for s in mask.level_sizes] != [tuple(s) for s in levels] or \
                    [level.tile for level in mask.levels] != self.program.tiles:
                raise FiseditError(
                    f"the plan was made for levels {mask.level_sizes} but this recording has "
                    f"levels {levels}; pass the mask itself, or make the plan with "
                    "recording.plan(mask)")
            return mask
        return self.engine.plan(validate_mask(mask, tuple(levels[0])))

    def _nothing_recorded(self) -> str:
        why = (" Fallbacks: " + "; ".join(self.fallbacks)) if self.fallbacks else (
            " Was the U-Net compiled with backend=\"fisedit\" and called inside the context?")
        return "the recording holds no U-Net call." + why

    def _finish(self, warn: bool = True) -> None:
        if self.growable:
            self.cache.resize(max(1, len(self.cache.steps)))
        if warn and not self.cache.steps:
            warnings.warn("fisedit: " + self._nothing_recorded(), UnsupportedGraphWarning,
                          stacklevel=3)

    def __repr__(self) -> str:
        return (f"Recording({type(self.unet).__name__}, {self.num_steps} steps, "
                f"{self.cache.nbytes() / 2**20:.1f} MiB)")


class Editing:
    """An editing session over a Recording: U-Net call ``k`` edits step ``start_step + k``.

    ``inputs[k]`` and ``outputs[k]`` are the edited call's inputs and output, ``steps[k]`` its
    recorded step, so ``fc.oracle.masked_dense(rec.engine, ed.plan, rec.inputs[ed.steps[k]],
    ed.inputs[k])`` is the reference for ``ed.outputs[k]``.
    """

    def __init__(self, recording: Recording, plan: MaskPlan, start_step: int):
        self.recording = recording
        self.plan = plan
        self.start_step = start_step
        self.steps: list[int] = []
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []
        self.fallbacks: list[str] = []      # why calls ran dense instead (warned when they did)

    def __repr__(self) -> str:
        return f"Editing({len(self.steps)} calls from step {self.start_step}, {self.plan!r})"


class _State:
    def __init__(self, unet):
        self.unet = unet
        self.param_ids = frozenset(id(p) for p in unet.parameters())
        self.warned: set = set()

    def fallback(self, graph, error, args, sink: list):
        if graph.strict:
            raise error
        reason = str(error)
        if reason not in sink:
            sink.append(reason)
        if graph.problem is None and id(graph) not in self.warned:  # else warned at compile
            self.warned.add(id(graph))
            warnings.warn(f"fisedit: {reason}; this U-Net call runs dense and is not "
                          f"{self.verb}", UnsupportedGraphWarning, stacklevel=3)
        return graph.forward(*args)


class _RecordState(_State):
    verb, activity = "recorded", "recording"

    def __init__(self, recording: Recording):
        super().__init__(recording.unet)
        self.recording = recording

    def call(self, graph: FiseditGraph, args):
        rec = self.recording
        try:
            program = graph.program(args, rec.config, rec.unet)
        except UnsupportedGraphError as error:
            return self.fallback(graph, error, args, rec.fallbacks)
        step = len(rec.inputs)
        if rec.growable:
            rec.cache.resize(max(rec.cache.num_steps, step + 1))
        elif step >= rec.cache.num_steps:
            raise FiseditError(
                f"the recording was opened with num_steps={rec.cache.num_steps} but the U-Net "
                f"is being called a {step + 1}th time; pass the pipeline's number of U-Net "
                "calls, or leave num_steps=None to record however many there are")
        flat = graph.flat_inputs(args)
        # Every step of a recording runs the program it started with (the cache keys are its
        # node names), even if Dynamo recompiled in between.
        rec.engine.add_program(program)
        output = rec.engine.record(rec.cache, step, **flat)
        rec.inputs.append({name: value.detach().clone() for name, value in flat.items()})
        rec.outputs.append(output.detach().clone())
        return (output,)


class _EditState(_State):
    verb, activity = "edited", "editing"

    def __init__(self, editing: Editing):
        super().__init__(editing.recording.unet)
        self.editing = editing

    def call(self, graph: FiseditGraph, args):
        ed, rec = self.editing, self.editing.recording
        if graph.problem is not None:
            return self.fallback(graph, UnsupportedGraphError(graph.problem), args,
                                 ed.fallbacks)
        step = ed.start_step + len(ed.steps)
        if step >= rec.num_steps:
            raise FiseditError(
                f"this is U-Net call {len(ed.steps) + 1} of the edit, for step {step}, but "
                f"the recording holds {rec.num_steps} steps (0..{rec.num_steps - 1}); run the "
                "edit with the scheduler and number of inference steps of the recording")
        flat = graph.flat_inputs(args)
        signature = SparseEngine.signature(flat)
        if not rec.engine.has_program(signature):
            raise FiseditError(
                f"this U-Net call has inputs ({describe_signature(signature)}) but the recording "
                f"was made with ({describe_signature(rec.cache.signature)}); edits must keep the "
                "resolution, batch and dtypes of the recorded generation")
        output = rec.engine.edit(rec.cache, step, ed.plan, **flat)
        ed.steps.append(step)
        ed.inputs.append({name: value.detach().clone() for name, value in flat.items()})
        ed.outputs.append(output.detach().clone())
        return (output,)


@contextlib.contextmanager
def _activate(state):
    active = _ACTIVE.get()
    for other in active:
        if other.unet is state.unet:
            raise FiseditError(
                f"this U-Net is already {other.activity}; recording and editing contexts "
                "of one U-Net cannot be nested")
    token = _ACTIVE.set(active + (state,))
    _LIVE.append(state)
    try:
        yield
    finally:
        _LIVE.remove(state)
        _ACTIVE.reset(token)


@contextlib.contextmanager
def recording(unet, config: SparseConfig | None = None, num_steps: int | None = None):
    """Record every call of a fisedit-compiled U-Net made inside the context, one step each.

    ``unet`` is the compiled U-Net (``torch.compile(unet, backend="fisedit")``, or a pipeline
    whose ``unet`` is one). Calls run densely and return exactly what the U-Net returns; each
    stores what edits of its step will read. ``num_steps`` may be left None (the cache grows).
    Yields the Recording.
    """
    module = _resolve_unet(unet)
    num_steps = check_optional_int("num_steps", num_steps, minimum=1)
    if config is not None and not isinstance(config, SparseConfig):
        raise FiseditError(f"config must be a SparseConfig, got {type(config).__name__}")
    rec = Recording(module, config or SparseConfig(), num_steps)
    with _activate(_RecordState(rec)):
        try:
            yield rec
        except BaseException:
            rec._finish(warn=False)
            raise
        rec._finish()


@contextlib.contextmanager
def editing(recording: Recording, mask, *, start_step: int = 0):
    """Edit a Recording: U-Net call ``k`` inside the context recomputes only the masked region
    of recorded step ``start_step + k`` (``mask``: bool ``[H, W]`` at the latent resolution,
    or a MaskPlan from ``recording.plan``). Timesteps, resolution, batch and dtypes must match
    the recording. Yields the Editing session (its plan and per-call inputs and outputs).
    """
    if not isinstance(recording, Recording):
        raise FiseditError(f"editing needs the Recording yielded by fc.recording(...), got "
                           f"{type(recording).__name__}")
    plan = recording.plan(mask)
    start_step = check_int("start_step", start_step, minimum=0,
                           maximum=recording.num_steps - 1)
    session = Editing(recording, plan, start_step)
    with _activate(_EditState(session)):
        yield session
    if not session.steps and not session.fallbacks:
        warnings.warn(
            "fisedit: no U-Net call was edited inside fc.editing; does the pipeline hold the "
            "compiled U-Net that was recorded (pipe.unet = torch.compile(unet, "
            "backend=\"fisedit\"), the same one as in fc.recording)?", UnsupportedGraphWarning,
            stacklevel=3)
