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

Python-level settings of the U-Net (FreeU, an IP-Adapter or LoRA scale, a cross_attention_kwargs
value, an attention processor) are not graph inputs: Dynamo bakes them into the graph and
recompiles when they change, into a graph of the same input signature. A recording therefore
remembers which graphs computed its program (``graph_fingerprint``; a graph that differs only
in form, such as a dynamic-size recompile, is compared by its canonical graph), and refuses a
call that runs another one, during the recording or in an edit, rather than silently running
the recorded setting.

Graphs the passes cannot handle (a graph break splitting the U-Net, a module that is not a
diffusers U-Net, a pass failure) fall back to ``gm.forward`` with an ``UnsupportedGraphWarning``
and are not recorded; a recording whose calls mix such graphs with recordable ones, and an edit
call through one, are refused (the recorded steps would not be the pipeline's). With
``options={"strict": True}`` the backend instead raises ``UnsupportedGraphError``, at compile
time (it then also builds the sparse program eagerly, so pass failures surface there; Dynamo
wraps the error in ``BackendCompilerFailed``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import itertools
import logging
import re
import warnings
import weakref

import torch

from .checks import check_bool, check_int, check_optional_int
from .compiler.capture import (check_unet, dynamo_input_name, is_module_state,
                               lower_dynamo_graph, required_arguments)
from .compiler.pipeline import build_program, canonical_graph, describe_signature_change
from .config import SparseConfig
from .engine.engine import (SparseEngine, check_finite_inputs, check_ignored_inputs,
                            check_plain_call, input_signature, stock_forward)
from .errors import FiseditError, UnsupportedGraphError
from .execution.plan import MaskPlan, validate_mask, warn_if_marks_nothing
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
    ``UnsupportedGraphError`` for a graph the passes cannot handle, instead of falling back to
    the dense graph with a warning (torch compiles at the first call and wraps the error in
    its ``BackendCompilerFailed``, whose ``inner_exception`` it is).
    """
    opts = _check_options(options)
    if mode not in (None, "default"):
        # Inductor's modes tune its own kernels; this backend runs the captured graph (dense)
        # or the engine's programs, so a mode would be dropped without effect.
        raise FiseditError(
            f"the fisedit backend has no compile modes, got mode={mode!r}; leave mode out "
            "(its options are backend options: options={\"strict\": True})")
    module, arg_names, frame_args = _frame_module()
    if module is not None and stock_forward(module):
        # Dynamo drops an input the graph does not read, so the graph's inputs cannot tell
        # one diffusers ignores; the frame's arguments can.
        check_ignored_inputs(module, frame_args)
    graph = FiseditGraph(gm, example_inputs, module=module, arg_names=arg_names,
                         strict=opts["strict"])
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


def _check_options(options) -> dict:
    """The backend's options, with the defaults filled in: a dict of known names (a string or
    another mapping-like value would otherwise be read letter by letter), each of its type
    (``strict="no"`` is truthy, so it would silently mean strict)."""
    if options is None:
        return dict(OPTIONS)
    if not isinstance(options, dict):
        raise FiseditError(
            f"the fisedit backend's options must be a dict, got {type(options).__name__} "
            f"{options!r}; pass e.g. torch.compile(unet, backend=\"fisedit\", "
            "options={\"strict\": True})")
    unknown = sorted(map(repr, set(options) - set(OPTIONS)))
    if unknown:
        raise FiseditError(f"unknown fisedit backend option(s) {', '.join(unknown)}; the "
                           f"options are {sorted(OPTIONS)}")
    opts = dict(OPTIONS, **options)
    check_bool("the fisedit backend option strict", opts["strict"])
    return opts


def _required_arguments(module) -> list[str]:
    """The names of ``module.forward``'s arguments without a default ([] if unknown)."""
    try:
        return required_arguments(inspect.signature(module.forward).parameters.values())
    except (AttributeError, TypeError, ValueError):
        return []


def _frame_module():
    """The module whose call Dynamo is compiling (``self`` of the frame), its forward's
    positional parameter names and the call's arguments by name ({} in a frame resumed after a
    graph break); (None, None, {}) if torch does not tell."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
        # A frame Dynamo resumes after a graph break holds only the variables still live
        # there: its arguments are the entry frame's, checked when that one compiled.
        code_name = getattr(getattr(root, "f_code", None), "co_name", "")
        resumed = "torch_dynamo_resume_in_" in code_name
        module = root.f_locals.get("self")
        if not isinstance(module, torch.nn.Module):
            # torch.compile(module) on some modules (torch.nn's own, e.g. a Conv2d) starts
            # Dynamo in a wrapper frame that holds the module as ``fn``.
            module = root.f_locals.get("fn")
    except Exception:  # noqa: BLE001 - private API; names then fall back to the defaults
        return None, None, {}
    if not isinstance(module, torch.nn.Module):
        return None, None, {}
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return module, None, {}
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    frame = root.f_locals
    if resumed:
        arguments = {}
    elif isinstance(frame.get("args"), tuple) and isinstance(frame.get("kwargs"), dict):
        # Dynamo starts in the module's call wrapper, which holds forward's arguments packed.
        arguments = {**dict(zip(names, frame["args"])), **frame["kwargs"]}
    else:
        arguments = {name: frame[name] for name in names if name in frame}
    return module, names, arguments


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
        # Python numbers Dynamo made inputs (``numbers``): constants of the sparse programs.
        self.number_names = _number_inputs(gm, example_inputs, module, arg_names)
        # Symbolic ints (a graph with dynamic shapes: its sizes, and Python ints Dynamo made
        # inputs): the lowering specializes them to the call's values, so they are numbers too.
        self.int_names = {i: dynamo_input_name(placeholders[i].name, arg_names)
                          for i, x in enumerate(example_inputs) if isinstance(x, torch.SymInt)}
        self.input_positions = [i for i, x in enumerate(example_inputs)
                                if isinstance(x, torch.Tensor) and i not in self.number_names
                                and not is_module_state(placeholders[i].name, x)]
        self.input_names = [dynamo_input_name(placeholders[i].name, arg_names)
                            for i in self.input_positions]
        self.arg_names = arg_names
        # Dynamo drops an input the graph does not read, such as the encoder_hidden_states=None
        # of Kandinsky 2.2's pipeline. The call bound every required argument of the forward,
        # so one the graph does not take was None (or unread): it is passed on as None, which
        # is what the engine takes for it.
        self.unread_required = [
            name for name in _required_arguments(module)
            if not any(taken == name or taken.startswith(name + "_")
                       for taken in self.input_names)]
        self.module_type = type(module).__name__ if module is not None else None
        self._module = weakref.ref(module) if module is not None else lambda: None
        self._probe = None if self.param_positions else next(iter(gm.parameters()), None)
        self.problem = _structural_problem(gm, example_inputs, module, self)
        # Per U-Net module, held weakly (the programs hold its parameters, not the module).
        self._built: "weakref.WeakKeyDictionary[torch.nn.Module, _Built]" = \
            weakref.WeakKeyDictionary()
        self._fingerprint: str | None = None      # see ``fingerprint``, computed on first use

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
        if states and self.problem is None:
            self._warn_not_the_contexts_unet(states)
        return self.forward(*args)            # another module's graph

    def _warn_not_the_contexts_unet(self, states) -> None:
        """A whole U-Net's graph called inside contexts of other U-Nets (``pipe.unet``
        replaced after the recording, by a reload of its weights say): its calls run dense,
        neither recorded nor edited, which is said at the first call, not after the run."""
        for state in states:
            if id(self) in state.warned:
                continue
            state.warned.add(id(self))
            warnings.warn(
                f"fisedit: a {self.module_type} that is not the one this fc.{state.activity} "
                f"context is for was called inside it, so its calls run dense and are not "
                f"{state.verb} (was pipe.unet replaced after fc.recording? a reloaded U-Net "
                "is another module: record again with it, or put the recorded one back)",
                UnsupportedGraphWarning, stacklevel=4)

    def numbers(self, args) -> dict[str, object]:
        """The values of the Python numbers Dynamo made inputs of this graph (a U-Net or
        attention-processor attribute, a ``cross_attention_kwargs`` value, every float under
        ``dynamic=True``), and of its symbolic ints (``int_names``), by name. A sparse program
        is built for one set of values, as constants: a recording and its edits must keep
        them."""
        return ({name: args[position].item() for position, name in self.number_names.items()}
                | {name: int(args[position]) for position, name in self.int_names.items()})

    def number_key(self, args) -> tuple:
        """``numbers(args)`` as a key: sorted (name, value) pairs."""
        return tuple(sorted(self.numbers(args).items()))

    def flat_inputs(self, args) -> dict[str, torch.Tensor | None]:
        """The call's U-Net inputs by the names the engine takes (``unread_required`` None)."""
        return dict.fromkeys(self.unread_required) | {
            name: args[i] for name, i in zip(self.input_names, self.input_positions)}

    @property
    def programs_built(self) -> int:
        """How many sparse programs this graph has built (0 until something is recorded)."""
        return sum(1 for built in self._built.values() for value in built.programs.values()
                   if not isinstance(value, Exception))

    # -- compile ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """What this Dynamo graph computes (``graph_fingerprint``), with each tensor input
        named as the U-Net names it: two graphs with one fingerprint run the same program."""
        if self._fingerprint is None:
            placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
            names = {placeholders[i]: name
                     for i, name in zip(self.input_positions, self.input_names)}
            self._fingerprint = graph_fingerprint(self.gm, lambda node: names.get(node,
                                                                              node.target))
        return self._fingerprint

    def program(self, args, config: SparseConfig, module):
        """The sparse Program for this call's signature and numbers under ``config`` (built
        on first use).

        Raises UnsupportedGraphError, with the reason, for a graph the passes cannot handle.
        """
        canonical = self.canonical(args, module)
        built = self._built_for(module)
        signature, numbers = self._key(args)
        key = (signature, config, numbers)
        if key not in built.programs:
            _keep_one_numbers(built.programs, key)
            try:
                built.programs[key] = build_program(signature, canonical, config)
            except Exception as error:  # noqa: BLE001 - a pass failure means "unsupported"
                built.programs[key] = _unsupported("the fisedit passes failed on this graph",
                                                   error)
        result = built.programs[key]
        if isinstance(result, Exception):
            raise result
        return result

    def canonical(self, args, module):
        """The analyzed canonical graph of this call's signature (lowered on first use), which
        every config's program is built from. Raises UnsupportedGraphError as ``program``."""
        if self.problem is not None:
            raise UnsupportedGraphError(self.problem)
        key = self._key(args)
        built = self._built_for(module)
        if key not in built.canonical:
            _keep_one_numbers(built.canonical, key)
            built.canonical[key] = self._canonical(args)
        result = built.canonical[key]
        if isinstance(result, Exception):
            raise result
        return result

    def _key(self, args) -> tuple:
        """What a canonical graph is lowered for: the inputs' signature and the numbers."""
        return (input_signature(self.flat_inputs(args)),
                self.number_key(args))

    def _built_for(self, module) -> "_Built":
        return self._built.setdefault(module, _Built()) if module is not None else _Built()

    def _canonical(self, args):
        try:
            lowered = lower_dynamo_graph(self.gm, list(args), self.arg_names,
                                         constant_positions=list(self.number_names))
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


def graph_fingerprint(gm: torch.fx.GraphModule, placeholder_name=None, state_ids=()) -> str:
    """A digest of what ``gm`` computes: each node's op, target and arguments (other nodes by
    position, constants by value) and the tensors it holds, ``state_ids`` (a U-Net's
    parameters and buffers, whose values change in place and are checked by their version
    counters) by identity, any other by value. Node names and source locations are left out:
    they do not change the result. ``placeholder_name(node)`` names inputs (default: the
    placeholder's own name).

    A Python-level setting of a U-Net (FreeU, an IP-Adapter or LoRA scale, an attention
    processor) is no input of its Dynamo graph: Dynamo bakes it in and recompiles when it
    changes, into a graph of the same input signature. The backend tells those graphs apart
    by this digest."""
    digest = hashlib.sha256()
    position: dict = {}
    for index, node in enumerate(gm.graph.nodes):
        position[node] = index
        if node.op == "placeholder":
            item = (node.op, placeholder_name(node) if placeholder_name else node.target)
        elif node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            item = (node.op, _value_key(value, state_ids))
        else:
            arguments = torch.fx.node.map_arg((node.args, node.kwargs),
                                              lambda arg: _NodeRef(position[arg]))
            item = (node.op, _target_key(node.target), arguments)
        digest.update(repr(item).encode())
    return digest.hexdigest()


class _NodeRef:
    """A node in a fingerprint: its position in the graph (names may differ)."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _target_key(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None)
    # (Falls back to the repr: an address then tells apart objects that may differ.)
    return f"{module}.{name}" if module and name else repr(target)


def _value_key(value, state_ids) -> tuple:
    if not isinstance(value, torch.Tensor):
        return ("object", repr(value))
    if id(value) in state_ids or isinstance(value, torch.nn.Parameter):
        return ("state", id(value))
    try:
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    except Exception:  # noqa: BLE001 - a tensor without plain bytes: only itself is equal
        return ("tensor", id(value))
    return ("tensor", str(value.dtype), tuple(value.shape),
            hashlib.sha256(data.tobytes()).hexdigest())


class _Built:
    """A graph's compiled state for one U-Net module."""

    def __init__(self):
        self.canonical: dict = {}   # (signature, numbers) -> analyzed canonical graph, or error
        self.programs: dict = {}    # (signature, config, numbers) -> Program, or the error


def _keep_one_numbers(cache: dict, key: tuple) -> None:
    """Before ``cache`` gains ``key``, whose last item is the numbers' values, drop its
    entries for the same signature (and config) with other values. A recording holds its own
    program, so the cache need keep only the latest values: a scale changed at every
    generation would otherwise keep a program, with its derived weight copies, per value."""
    for other in [other for other in cache if other[:-1] == key[:-1]]:
        del cache[other]


def _unsupported(what: str, error: Exception) -> UnsupportedGraphError:
    wrapped = UnsupportedGraphError(f"{what} ({type(error).__name__}: {error})")
    wrapped.__cause__ = error
    return wrapped


def _structural_problem(gm, example_inputs, module, graph) -> str | None:
    """Why this graph is not one whole U-Net call (None if it looks like one)."""
    if module is not None:
        try:
            check_unet(module)
        except FiseditError as error:
            return str(error)
    if any(node.target is torch.ops.higher_order.tag_activation_checkpoint
           for node in gm.graph.nodes):
        return ("the U-Net runs with gradient checkpointing while gradients are on, which "
                "wraps its blocks in checkpoint regions the engine cannot capture; call it "
                "under torch.no_grad(), as diffusers pipelines do, or call "
                "unet.disable_gradient_checkpointing()")
    outputs = gm.graph.output_node().args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != 1:
        return (f"the graph returns {len(outputs)} values, not one sample: either a graph "
                "break split the U-Net call (torch.compile(..., fullgraph=True) shows where), "
                "or the call writes Python state that torch.compile hands back as outputs: "
                "PEFT's LoRA scale set through cross_attention_kwargs={'scale': s} once "
                "Dynamo makes it an input (fuse the LoRA at that scale instead, "
                "pipe.fuse_lora(lora_scale=s), on the uncompiled U-Net), an attention "
                "processor that stores its maps (self-attention guidance)")
    if "timestep" in graph.number_names.values():
        return ("the graph takes the timestep as a Python number (Dynamo makes a number that "
                "changed between calls a graph input); pass the timestep as a tensor, "
                "torch.tensor(t), as diffusers pipelines do")
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


def _number_inputs(gm, example_inputs, module, arg_names) -> dict[int, str]:
    """The placeholders that are Python numbers, which Dynamo passes as fresh 0-d tensors on
    each call, by position: their names. Dynamo makes a number an input once its value
    changed between calls (an IP-Adapter or LoRA scale), a NumPy scalar from the first call
    (the skip blocks' ``output_scale_factor``), and under ``dynamic=True`` every float of the
    modules. Those it names after ``self`` (a module attribute) would otherwise pass for
    module state, whose tensors ``lower_dynamo_graph`` bakes in by reference: right for
    weights, wrong for a number, whose next call's value is a new tensor. Dynamo marks them
    in the placeholder's ``grapharg`` (a private field); should that move, a 0-d module-state
    placeholder that is none of the module's own tensors is taken for one."""
    state = (None if module is None else
             {id(t) for t in itertools.chain(module.parameters(), module.buffers())})
    numbers = {}
    for position, (node, example) in enumerate(zip(
            [n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)):
        if not isinstance(example, torch.Tensor):
            continue
        number = getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", None)
        if number is None:
            number = (state is not None and example.dim() == 0
                      and is_module_state(node.name, example) and id(example) not in state)
        if number:
            # (Dynamo spells attribute paths with the modules' dicts: self_dict_modules_a_...)
            name = re.sub(r"_(dict_)?modules_", "_", dynamo_input_name(node.name, arg_names))
            numbers[position] = name.removeprefix("self_")
    return numbers


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
    if isinstance(unet, (Recording, Editing)):
        # It holds a .unet too, which would be taken for a pipeline's and then reported as
        # "not compiled".
        raise FiseditError(
            f"fc.recording takes the compiled U-Net or the pipeline holding it, got a "
            f"{type(unet).__name__}; to edit a recording use fc.editing(recording, mask), or "
            "record again with fc.recording(pipe)")
    if not isinstance(unet, torch.nn.Module) and hasattr(unet, "unet"):
        unet = unet.unet                                  # a pipeline
    original = getattr(unet, "_orig_mod", None)           # torch.compile(unet)
    if original is None and getattr(unet, "_compiled_call_impl", None) is not None:
        original = unet                                   # unet.compile()
    if original is None:
        if hasattr(unet, "_torchdynamo_orig_callable"):
            # torch.compile of a module already compiled gives a function (a notebook cell
            # that compiles pipe.unet, run twice).
            raise FiseditError(
                "this is a function torch.compile made, not a compiled U-Net module: "
                "torch.compile was applied to an already compiled U-Net (a cell run twice?); "
                "compile the plain U-Net once: pipe.unet = torch.compile(unet, "
                "backend=\"fisedit\") with unet the UNet2DConditionModel (reload it, or "
                "keep it before compiling)")
        # getattr: not every object has a __dict__ (None, an int); check_unet names those.
        if hasattr(getattr(unet, "__dict__", {}).get("forward"), "_torchdynamo_orig_callable"):
            raise FiseditError(
                f"this {type(unet).__name__}'s forward was compiled (unet.forward = "
                "torch.compile(unet.forward, ...)), not the module, which is what fc.recording "
                "follows; restore the forward and compile the module: del pipe.unet.forward; "
                "pipe.unet = torch.compile(pipe.unet, backend=\"fisedit\")")
        check_unet(unet)
        raise FiseditError(
            f"this {type(unet).__name__} is not compiled; compile it with the fisedit backend "
            "first: pipe.unet = torch.compile(pipe.unet, backend=\"fisedit\")")
    check_unet(original)
    backend = _compiled_backend_name(unet)
    if backend is not None and backend not in (BACKEND_NAME, fisedit_backend.__name__):
        # The whole generation would run before the recording found it held no call.
        raise FiseditError(
            f"this U-Net is compiled with the {backend!r} backend, so no call of it reaches "
            "fc.recording; compile the plain U-Net with the fisedit backend: pipe.unet = "
            "torch.compile(pipe.unet._orig_mod, backend=\"fisedit\")")
    return original


def _compiled_backend_name(compiled) -> str | None:
    """The backend a ``torch.compile``d module was compiled with, by the name torch gives it
    (``"fisedit"``, ``"inductor"``, ...), where torch's wrapper shows it; None where it does
    not (``unet.compile()``, other torch versions): the recording then finds out at its end."""
    wrapper = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(4):          # torch's wrappers, each holding the next (frame converters)
        name = getattr(wrapper, "compiler_name", None)
        if isinstance(name, str):
            return name
        wrapper = getattr(wrapper, "_torchdynamo_orig_backend", None)
    return None


class Recording:
    """One recorded generation: the cache of every U-Net call (step) and its inputs.

    ``engine`` is a SparseEngine over the U-Net holding the programs the recording used (made
    again, with ``cache``, at the first call: read them after the run), so
    ``engine.stats(plan)`` and ``fc.oracle.masked_dense(rec.engine, plan, rec.inputs[i],
    edited_inputs)`` work on it. ``inputs[i]`` are the tensor inputs of step ``i`` (the
    U-Net's argument names, ``added_cond_kwargs`` flattened; None for a required argument the
    graph does not read, as Kandinsky 2.2's encoder_hidden_states) and ``outputs[i]`` its
    output.
    """

    def __init__(self, unet, config: SparseConfig, num_steps: int | None):
        self.unet = unet
        self.config = config
        self.engine = SparseEngine(unet, config)
        self.growable = num_steps is None
        self.cache = self.engine.new_cache(num_steps if num_steps is not None else 1)
        self.inputs: list[dict[str, torch.Tensor | None]] = []
        self.outputs: list[torch.Tensor] = []
        self.fallbacks: list[str] = []
        # Per signature with a program in ``engine``: the Dynamo graphs (fingerprint and the
        # values of the Python numbers they take) known to compute that program
        # (``_runs_recorded_program``), and its canonical graph's fingerprint.
        self._graphs: dict[tuple, set[tuple]] = {}
        self._canonical_fingerprints: dict[tuple, str] = {}
        self._state_ids = frozenset(id(t) for t in
                                    itertools.chain(unet.parameters(), unet.buffers()))
        # The exception that ended the recording context, if one did: the pipeline may have
        # stopped before its last step, so the recording may hold part of a generation.
        self.interrupted_by: str | None = None

    def _start_from_the_unet_as_it_is(self) -> None:
        """Take the U-Net as it is at the recording's first call, not as it was when the
        context opened: a pipeline may set it up inside its own call (the PAG pipelines
        install their attention processors there and restore them at its end), and the
        recording is of the U-Net its calls run. Nothing is recorded yet (a first call that
        failed left nothing): a new engine and cache, for the same config and step count,
        and no graph known to compute a program."""
        num_steps = None if self.growable else self.cache.num_steps
        self.engine = SparseEngine(self.unet, self.config)
        self.cache = self.engine.new_cache(num_steps if num_steps is not None else 1)
        self._graphs.clear()
        self._canonical_fingerprints.clear()

    def _runs_recorded_program(self, graph: "FiseditGraph", args, signature: tuple) -> bool:
        """Whether ``graph``, called on ``args`` (of ``signature``, which has a program in
        ``engine``), computes what that program computes.

        Dynamo compiles a new graph when a Python-level setting of the U-Net changes (FreeU,
        an IP-Adapter or LoRA scale, an attention processor), with the same inputs: the program
        in ``engine`` would then silently compute the old setting; or it makes the setting a
        number input of the graph, whose value the program holds as a constant. Dynamo also
        recompiles without any change to what the U-Net computes (a graph with dynamic sizes
        after a resolution change, another compiled wrapper of the same U-Net): such a graph
        lowers to the same canonical graph, which is compared when the cheap digest of the
        Dynamo graph and its numbers is not known (once per graph and numbers; a match is
        remembered). A known graph with other numbers is refused without lowering it: its
        program would hold other constants."""
        known = self._graphs[signature]
        graph_and_numbers = (graph.fingerprint, graph.number_key(args))
        if graph_and_numbers in known:
            return True
        if any(fingerprint == graph.fingerprint for fingerprint, _ in known):
            return False    # a known graph with other numbers: other constants (not lowered)
        try:
            canonical = graph.canonical(args, self.unet)
        except UnsupportedGraphError:
            return False
        if signature not in self._canonical_fingerprints:
            recorded = self.engine.program(graph.flat_inputs(args)).canonical
            self._canonical_fingerprints[signature] = graph_fingerprint(
                recorded, state_ids=self._state_ids)
        if graph_fingerprint(canonical, state_ids=self._state_ids) != \
                self._canonical_fingerprints[signature]:
            return False
        known.add(graph_and_numbers)
        return True

    def _unlike_recorded(self, graph: "FiseditGraph", args, signature: tuple) -> str | None:
        """Why this call does not run the recorded program of ``signature``, for a message
        (None when it does)."""
        if self._runs_recorded_program(graph, args, signature):
            return None
        numbers = graph.numbers(args)
        for fingerprint, recorded in self._graphs[signature]:
            if fingerprint == graph.fingerprint:     # the same graph: a number changed
                recorded = dict(recorded)
                return "a Python number its graph takes changed (" + "; ".join(
                    f"{name} was {recorded[name]!r} and is {numbers[name]!r}"
                    for name in sorted(numbers) if numbers[name] != recorded[name]) + ")"
        return "Dynamo compiled another U-Net graph for it"

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
            self.engine.check_plan(mask, self.program, remedy="pass the mask itself, or make "
                                   "the plan with recording.plan(mask)")
            return mask
        return self.engine.plan(validate_mask(mask, tuple(levels[0])))

    def _nothing_recorded(self) -> str:
        why = (" Fallbacks: " + "; ".join(self.fallbacks)) if self.fallbacks else (
            " Was the U-Net compiled with backend=\"fisedit\" and called inside the context? "
            + _PAST_RECOMPILE_LIMIT)
        if any("is not a diffusers U-Net" in reason for reason in self.fallbacks):
            why += (". Graphs of the U-Net's submodules mean that a graph break split the "
                    "U-Net call, so Dynamo compiled its pieces (Python control flow on a "
                    "tensor's value, an unsupported call): torch.compile(..., fullgraph=True) "
                    "shows where")
        return "the recording holds no U-Net call." + why

    def _finish(self, interrupted_by: BaseException | None = None) -> None:
        if self.growable:
            self.cache.resize(max(1, len(self.cache.steps)))
        if interrupted_by is not None:
            self.interrupted_by = type(interrupted_by).__name__
        elif not self.cache.steps:
            warnings.warn("fisedit: " + self._nothing_recorded(), UnsupportedGraphWarning,
                          stacklevel=3)
        elif self.num_steps < self.cache.num_steps:
            warnings.warn(
                f"fisedit: the recording holds {self.num_steps} U-Net calls but was made with "
                f"num_steps={self.cache.num_steps}; edits run {self.num_steps} steps (leave "
                "num_steps out to size the recording by the calls made)", UserWarning,
                stacklevel=3)

    def _interruption(self) -> str:
        """For messages: how the recording ended early, if it did."""
        if self.interrupted_by is None:
            return ""
        return (f" (the recording context ended with a {self.interrupted_by} after "
                f"{self.num_steps} U-Net calls, so it may hold only part of the generation; "
                "record it again)")

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
        self.inputs: list[dict[str, torch.Tensor | None]] = []
        self.outputs: list[torch.Tensor] = []

    def __repr__(self) -> str:
        return f"Editing({len(self.steps)} calls from step {self.start_step}, {self.plan!r})"


class _State:
    def __init__(self, unet):
        self.unet = unet
        self.param_ids = frozenset(id(p) for p in unet.parameters())
        self.warned: set = set()        # the graphs this context has warned about


class _RecordState(_State):
    verb, activity = "recorded", "recording"

    def __init__(self, recording: Recording):
        super().__init__(recording.unet)
        self.recording = recording

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

    def call(self, graph: FiseditGraph, args):
        rec = self.recording
        step = len(rec.inputs)
        if graph.problem is not None:
            if step:
                raise FiseditError(_changed_during_recording(
                    step, f"it cannot be recorded ({graph.problem}), but the earlier calls "
                    "could"))
            return self.fallback(graph, UnsupportedGraphError(graph.problem), args,
                                 rec.fallbacks)
        if not rec.cache.steps and not rec.fallbacks:     # nothing recorded or refused yet
            rec._start_from_the_unet_as_it_is()
        # Everything that refuses the call is checked before any program is built for it.
        flat = graph.flat_inputs(args)
        check_plain_call(flat)
        signature = input_signature(flat)
        if rec.cache.signature is not None and signature != rec.cache.signature:
            raise FiseditError(
                f"U-Net call {step + 1} of this recording has other inputs than the "
                f"recorded calls: {describe_signature_change(signature, rec.cache.signature)}; "
                "one recording is one "
                "generation: keep the resolution, batch, dtypes and the U-Net's arguments and "
                "settings fixed while recording")
        if step and _starts_again(rec.engine.host_timestep(flat), rec.cache.timesteps.get(0),
                                  rec.cache.timesteps.get(step - 1)):
            raise FiseditError(
                f"U-Net call {step + 1} of this recording is at a higher timestep than the call "
                "before, after falling ones: a second pipeline run inside one fc.recording, "
                "whose steps would follow the first run's as if one generation (an edit would "
                "then read the first run's, a warm-up's say); one recording is one run: open "
                "a new fc.recording for each run")
        if not rec.growable and step >= rec.cache.num_steps:
            raise FiseditError(
                f"the recording was opened with num_steps={rec.cache.num_steps} but this is "
                f"U-Net call {step + 1}; pass the pipeline's number of U-Net "
                "calls, or leave num_steps=None to record however many there are")
        if signature in rec._graphs:
            # Every step of a recording runs one program (the cache keys are its node names),
            # so a later call must run the graph that made it.
            why = rec._unlike_recorded(graph, args, signature)
            if why:
                raise FiseditError(_changed_during_recording(step, why))
        else:
            try:
                program = graph.program(args, rec.config, rec.unet)
            except UnsupportedGraphError as error:
                if step:
                    raise FiseditError(_changed_during_recording(
                        step, f"it cannot be recorded ({error}), but the earlier calls "
                        "could")) from error
                return self.fallback(graph, error, args, rec.fallbacks)
            if rec.fallbacks:
                raise FiseditError(
                    "this U-Net call of the recording can be recorded but the earlier calls "
                    f"could not ({'; '.join(rec.fallbacks)}), so the recorded steps would not "
                    "be the pipeline's: a Python-level setting of the U-Net changed during "
                    f"the recording ({_SETTINGS}); keep the U-Net's settings fixed for the "
                    "whole generation and record it again")
            # The engine is the recording's own and starts empty: the program stored for the
            # signature is this one, and the graph that made it is known from here on.
            rec.engine.add_program(program)
            rec._graphs[signature] = {(graph.fingerprint, graph.number_key(args))}
        kept = _kept(flat)      # before the cache changes: a failed copy changes nothing
        size = rec.cache.num_steps
        if rec.growable:
            rec.cache.resize(max(size, step + 1))
        try:
            output = rec.engine.record(rec.cache, step, **flat)
        except BaseException:
            # A failed call leaves the recording as it was (record stores the step at its
            # end, so a stored step means only an interrupt after it: that step is then kept).
            if rec.growable and step not in rec.cache.steps:
                rec.cache.resize(size)
            raise
        # (Only a failure of this one copy, after the step is stored, leaves the step without
        # its inputs and output here; the pipeline's retry records the same step again.)
        recorded = output.detach().clone()
        rec.inputs.append(kept)
        rec.outputs.append(recorded)
        return (output,)


def _kept(flat: dict) -> dict:
    """A call's inputs as a recording or edit keeps them: copies, the caller's own tensors
    free to change."""
    return {name: None if value is None else value.detach().clone()
            for name, value in flat.items()}


# Why a compiled U-Net's calls can reach no fisedit graph at all, for messages: Dynamo gives
# up on a function silently once it has compiled it recompile_limit times.
_PAST_RECOMPILE_LIMIT = (
    "(Past torch._dynamo.config.recompile_limit recompilations of one function, as many "
    "input shapes, dtypes or configs, Dynamo runs it eagerly without a word: call "
    "torch._dynamo.reset() or raise the limit.)")

# What changes a U-Net's Dynamo graph without changing its inputs, for messages.
_SETTINGS = ("FreeU, an IP-Adapter scale, a LoRA scale or its adapters, a cross_attention_kwargs "
             "value, an attention processor")


def _changed_during_recording(step: int, why: str) -> str:
    return (f"U-Net call {step + 1} of this recording does not run the U-Net of the earlier "
            f"calls: {why}. A Python-level setting of the U-Net changed during the recording "
            f"({_SETTINGS}; e.g. a step-end callback such as diffusers' "
            "IPAdapterScaleCutoffCallback), and one recording must run one U-Net for all its "
            "steps; keep those settings fixed for the whole generation and record it again")


def _changed_since_recording(why: str) -> str:
    return (f"this edit call does not run the U-Net that was recorded: {why}. A Python-level "
            f"setting of the U-Net changed between record and edit ({_SETTINGS}), and the "
            "recorded values belong to the old one; set it back as it was while recording, or "
            "record the generation again with the new settings")


class _EditState(_State):
    verb, activity = "edited", "editing"

    def __init__(self, editing: Editing):
        super().__init__(editing.recording.unet)
        self.editing = editing

    def call(self, graph: FiseditGraph, args):
        ed, rec = self.editing, self.editing.recording
        if graph.problem is not None:
            # The recorded graph had none (it was recorded), so this is another graph: running
            # it dense would regenerate the whole image, not edit the recorded one.
            raise FiseditError(_changed_since_recording(f"it cannot be edited ({graph.problem})"))
        step = ed.start_step + len(ed.steps)
        flat = graph.flat_inputs(args)
        if ed.steps and _starts_again(rec.engine.host_timestep(flat),
                                      rec.cache.timesteps.get(ed.start_step),
                                      rec.cache.timesteps.get(step - 1)):
            raise FiseditError(
                f"U-Net call {len(ed.steps) + 1} of this edit is at a higher timestep than the "
                "call before, after falling ones: a second pipeline run inside one "
                "fc.editing, which would edit the recording's later steps with the run's "
                "first ones; one context edits one run: open a new fc.editing for each")
        if step >= rec.num_steps:
            raise FiseditError(
                f"this is U-Net call {len(ed.steps) + 1} of the edit, for step {step}, but "
                f"the recording holds {rec.num_steps} steps (0..{rec.num_steps - 1})"
                f"{rec._interruption()}; run the "
                "edit with the scheduler and number of inference steps of the recording")
        check_plain_call(flat)
        signature = input_signature(flat)
        if not rec.engine.has_program(signature):
            raise FiseditError(
                "this U-Net call has other inputs than the recording: "
                f"{describe_signature_change(signature, rec.cache.signature)}; edits must keep the "
                "resolution, batch and dtypes, and the U-Net's arguments and settings, of the "
                "recorded generation")
        why = rec._unlike_recorded(graph, args, signature)
        if why:
            raise FiseditError(_changed_since_recording(why))
        if not ed.steps:
            check_finite_inputs(flat)    # a NaN differs from everything: named as what it is
            recorded, now = rec.cache.timesteps.get(step), rec.engine.host_timestep(flat)
            first = rec.cache.timesteps.get(0)
            known = now is not None and first is not None and recorded is not None
            if step and known and not ed.plan.full and torch.equal(now, first) and \
                    not torch.equal(now, recorded):
                raise FiseditError(
                    f"the edit's first U-Net call is at the timestep of the recording's step 0, "
                    f"but fc.editing(..., start_step={step}) edits from step {step}; start_step "
                    "is for a run that begins at a later step of the recording (the last "
                    "steps of a generation), so for a whole run leave start_step at 0")
            # Another timestep (img2img's strength changed) is the engine's to name, below: a
            # sample of another timestep differs everywhere, for that reason.
            if recorded is None or now is None or torch.equal(recorded, now):
                _check_first_sample(ed.plan, rec.inputs[step]["sample"], flat["sample"], step)
        output = rec.engine.edit(rec.cache, step, ed.plan, **flat)
        # Copied before the edit notes the step: a failed copy leaves it as it was.
        kept, edited = _kept(flat), output.detach().clone()
        ed.steps.append(step)
        ed.inputs.append(kept)
        ed.outputs.append(edited)
        return (output,)


def _starts_again(now, start, last) -> bool:
    """Whether a call at timestep ``now`` starts a pipeline run again: above the call before
    (``last``), after timesteps that fell from the run's first (``start``). A run's timesteps
    never rise: a scheduler that repeats them (Heun's pairs, DPM++ 2M Karras's last), a
    pipeline that calls the U-Net twice a step, and an inversion (whose timesteps rise from the
    first) pass. A one-step run before another starting at the same timestep cannot be told
    from two calls a step. Host tensors (``SparseEngine.host_timestep``); None where the U-Net
    takes no timestep."""
    if now is None or start is None or last is None:
        return False
    return bool((now > last).all() and (start > last).all())


def _check_first_sample(plan: MaskPlan, recorded: torch.Tensor, sample: torch.Tensor,
                        step: int) -> None:
    """An edit's first U-Net call starts from the recording's latents: outside the region the
    plan recomputes, its outputs are the recorded ones, so a sample that differs there (other
    noise: another seed or generator; rows of another meaning in a batch of the same shape:
    the guidance scale turned on or off against num_images_per_prompt) would be dropped there
    without a word. Later calls may differ (the latents drift outside the mask, README). One
    comparison and one host read, at the first call only."""
    if plan.differs_outside(sample, recorded):
        raise FiseditError(
            f"the edit's first U-Net call (step {step}) is fed a sample that differs from the "
            "recording's outside the edit region, where the edit keeps the recorded outputs, "
            "so the difference would be dropped: other noise (another seed, generator or "
            "latents) or a batch of another meaning (guidance on or off, num_images_per_prompt "
            "changed); run the edit with the recording's noise and batch, or record the "
            "generation again with the new ones")


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


class _SingleUse:
    """A generator-based context that says so when a ``with`` enters it a second time
    (contextlib's own error names only its internals)."""

    def __init__(self, name: str, context):
        self._name, self._context, self._entered = name, context, False

    def __enter__(self):
        if self._entered:
            raise FiseditError(
                f"this fc.{self._name}(...) context was entered already; each with-statement "
                f"needs its own: with fc.{self._name}(...) as ...")
        self._entered = True
        return self._context.__enter__()

    def __exit__(self, *exc_info):
        return self._context.__exit__(*exc_info)


def _single_use(function):
    """``contextlib.contextmanager``, with contexts that refuse a second entry clearly."""
    manager = contextlib.contextmanager(function)

    @functools.wraps(function)
    def make(*args, **kwargs):
        return _SingleUse(function.__name__, manager(*args, **kwargs))
    return make


@_single_use
def recording(unet, config: SparseConfig | None = None, num_steps: int | None = None):
    """Record every call of a fisedit-compiled U-Net made inside the context, one step each.

    ``unet`` is the compiled U-Net (``torch.compile(unet, backend="fisedit")``, or a pipeline
    whose ``unet`` is one). Calls run densely and return what the U-Net returns, up to rounding
    (the captured graph may order a sum otherwise); each stores what edits of its step will
    read. ``num_steps`` may be left None (the cache grows). Yields the Recording.
    """
    module = _resolve_unet(unet)
    num_steps = check_optional_int("num_steps", num_steps, minimum=1)
    if config is not None and not isinstance(config, SparseConfig):
        raise FiseditError(f"config must be a SparseConfig, got {type(config).__name__}")
    if config is not None and config.frontend != SparseConfig.frontend:
        raise FiseditError(
            f"SparseConfig.frontend={config.frontend!r} chooses how fc.compile captures a "
            "U-Net; the backend's graphs are Dynamo's already, lowered through torch.export, "
            "so it would be ignored; leave frontend out")
    rec = Recording(module, config or SparseConfig(), num_steps)
    with _activate(_RecordState(rec)):
        try:
            yield rec
        except BaseException as error:
            rec._finish(interrupted_by=error)
            raise
        rec._finish()


@_single_use
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
    # 4: through this generator, contextlib and _SingleUse.__enter__ to the user's with.
    warn_if_marks_nothing(plan.levels[0].count, stacklevel=4,
                          remedy="mark the region to edit (True)")
    if recording.interrupted_by is not None:
        warnings.warn("fisedit: editing a recording whose context ended with an exception"
                      + recording._interruption(), UserWarning, stacklevel=4)
    # A context is its own edit pass, even where it picks up at the step after the last
    # context's last one with the same plan (engine.plan returns the same plan for the same
    # mask): between them the U-Net's weights may have been written through param.data.
    recording.cache.end_pass()
    session = Editing(recording, plan, start_step)
    with _activate(_EditState(session)):
        yield session
    if session.steps and session.steps[-1] < recording.num_steps - 1:
        warnings.warn(
            f"fisedit: the edit ended at step {session.steps[-1]} of a recording of "
            f"{recording.num_steps} steps (0..{recording.num_steps - 1}): the pipeline run "
            "stopped early (interrupted, or run with fewer steps than recorded), so its output "
            "is not a finished edit", UserWarning, stacklevel=4)
    if not session.steps:
        warnings.warn(
            "fisedit: no U-Net call was edited inside fc.editing; does the pipeline hold the "
            "compiled U-Net that was recorded (pipe.unet = torch.compile(unet, "
            "backend=\"fisedit\"), the same one as in fc.recording)? " + _PAST_RECOMPILE_LIMIT,
            UnsupportedGraphWarning, stacklevel=4)
