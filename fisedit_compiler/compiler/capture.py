"""Frontends: turn a diffusers U-Net into an ATen-level torch.fx GraphModule.

Two frontends, one output form:

* ``export``: ``torch.export.export(unet, (), inputs, strict=False)``. Non-strict export is the
  quickest full-graph capture of a diffusers U-Net (``fx.symbolic_trace`` fails on all of them)
  and its output equals eager. We never call the default ``run_decompositions()``: it splits
  attention, SiLU and linear, which are exactly the ops the sparse passes replace.
* ``dynamo``: the graph a ``torch.compile`` backend receives (parameters as placeholders, torch
  functions as ops) is lowered by the same non-strict export, so both frontends reach the same
  ATen dialect and a single canonicalizer serves both.

The result is a GraphModule whose parameters and buffers are ``get_attr`` nodes on its own root
module and whose placeholders are the tensor user inputs, named after the U-Net's keyword
arguments, nested ones flattened (``added_cond_kwargs_text_embeds``,
``down_block_additional_residuals_0``; see ``flatten_inputs``). ``gm.meta["fc_inputs"]``
lists those names in placeholder order. The graph is functional: in-place ops are rewritten
out of place (``_functional``), so no value the engine records is written to afterwards.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.fx as fx

from ..checks import check_float, check_int, check_seed
from ..config import FRONTENDS
from ..errors import FiseditError, UnsupportedGraphError
from ..graph_keys import INPUT_POSITIONS, INPUTS



def check_unet(module) -> None:
    from diffusers import UNet2DConditionModel, UNet2DModel

    unets = (UNet2DConditionModel, UNet2DModel)
    # ``pipe.unet = torch.compile(pipe.unet, backend="fisedit")`` (the README's backend
    # section) wraps the U-Net in an OptimizedModule, which keeps it as ``_orig_mod``: "pass
    # pipe.unet" would not help a user who did pass it.
    inner = getattr(module, "_orig_mod", None)
    if not isinstance(module, unets) and isinstance(inner, unets):
        raise FiseditError(
            f"this {type(module).__name__} is a {type(inner).__name__} wrapped by "
            "torch.compile; fisedit-compiler compiles the U-Net itself: pass the uncompiled "
            "U-Net, unet._orig_mod (for a pipeline, set pipe.unet = pipe.unet._orig_mod "
            "first); or, compiled with backend=\"fisedit\", keep it and record and edit "
            "through fc.recording / fc.editing")
    if not isinstance(module, unets):
        raise FiseditError(
            f"{type(module).__name__} is not a diffusers U-Net: fisedit-compiler compiles "
            "UNet2DConditionModel and UNet2DModel (for a pipeline, pass pipe.unet)")
    meta = next((name for name, tensor in itertools.chain(module.named_parameters(),
                                                          module.named_buffers())
                 if tensor.is_meta), None)
    if meta is not None and (hasattr(module, "_hf_hook") or "forward" in module.__dict__):
        raise FiseditError(
            f"the U-Net's weights are on the meta device (e.g. {meta}) behind an offloading "
            "hook (enable_sequential_cpu_offload or a device_map), which loads them only "
            "inside its own forward; fisedit-compiler runs the U-Net on one device: call "
            "pipe.remove_all_hooks(), del pipe.unet.forward, and pipe.to(device)")
    if meta is not None:
        # Capture works on shapes alone, so without this the first record would fail only
        # after the whole compile, copying out of a tensor that has no data.
        raise FiseditError(
            f"the U-Net's weights are on the meta device (e.g. {meta}), which holds shapes but "
            "no values; load them first (from_pretrained, or unet.to_empty(device=...) and "
            "load_state_dict)")


def required_arguments(parameters) -> list[str]:
    """The names among a forward's ``inspect.Parameter``s that a call must bind: those without
    a default (``*args`` and ``**kwargs`` aside)."""
    return [p.name for p in parameters if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def flatten_inputs(inputs: dict, unet=None) -> dict[str, torch.Tensor]:
    """The tensor inputs of a U-Net call under the names the captured graph uses.

    Nested inputs are flattened as export and Dynamo name them: a dict entry joins its key
    (``added_cond_kwargs_text_embeds``), a list or tuple item its index
    (``down_block_additional_residuals_0``, ``added_cond_kwargs_image_embeds_1``). A
    Python-number timestep becomes the tensor ``unet`` would make of it (``tensor_timestep``).
    """
    flat = {}
    for name, value in tensor_timestep(inputs, unet).items():
        if isinstance(value, dict):
            flat.update(flatten_inputs({f"{name}_{key}": inner for key, inner in value.items()}))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten_inputs({f"{name}_{index}": inner
                                        for index, inner in enumerate(value)}))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def tensor_timestep(inputs: dict, unet=None) -> dict:
    """``inputs`` with a Python-number timestep as the 0-d tensor ``unet``'s forward makes of
    it (the U-Net moves it to its device, as it does a number). Why: export would bake a
    number into the graph as a constant, and the graph must take each step's timestep as an
    input; and the dtype is the U-Net's own: ``UNet2DModel`` truncates any number to
    ``torch.long`` (37.5 runs as 37), ``UNet2DConditionModel`` keeps a float in float64 (a
    Fourier time embedding of t = 999 differs by ~1e-3 computed in float32) and an int in
    int64. Which U-Net it is must be known for a number: without ``unet`` it is refused."""
    value = inputs.get("timestep")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return inputs
    if unet is None:
        raise FiseditError("a Python-number timestep is made a tensor as the U-Net makes it: "
                           "pass the U-Net (flatten_inputs(inputs, unet)), or pass the "
                           "timestep as a tensor")
    if not math.isfinite(value):        # as a long it would be refused with no clear cause
        raise FiseditError(f"the timestep is {value}, not finite; pass the scheduler's "
                           "timesteps")
    from diffusers import UNet2DModel

    if isinstance(unet, UNet2DModel):
        dtype = torch.long
    else:
        dtype = torch.float64 if isinstance(value, float) else torch.int64
    return dict(inputs, timestep=torch.tensor(value, dtype=dtype))


def configured_latent_size(config) -> tuple[int, int] | None:
    """The latent (height, width) a U-Net config's ``sample_size`` gives (one int for a
    square, or a pair, as diffusers takes it); None where the config tells no valid size."""
    size = config.get("sample_size")

    def side(value):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if side(size):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(map(side, size)):
        return tuple(size)
    return None


def latent_size(model) -> tuple[int, int]:
    """The latent (height, width) of ``model``'s config, or a FiseditError naming the fix."""
    size = configured_latent_size(model.config)
    if size is None:
        raise FiseditError(
            f"the U-Net's config.sample_size is {model.config.get('sample_size')!r}, which "
            "gives no latent size; pass height and width explicitly (or set sample_size to "
            "a positive int or a (height, width) pair)")
    return size


def _example_timestep(cfg, timestep: float | None) -> tuple:
    """``(timestep, dtype)`` of ``example_inputs``: a learned time embedding looks its timestep
    up in a table, so it takes a whole one inside the table, as an integer tensor."""
    if cfg.get("time_embedding_type") != "learned":
        return check_float("timestep", 500.0 if timestep is None else timestep), torch.float32
    rows = cfg.get("num_train_timesteps")
    if timestep is None:
        return rows // 2, torch.long
    timestep = check_float("timestep", timestep)
    if timestep != int(timestep) or not 0 <= timestep < rows:
        raise FiseditError(
            f"this U-Net's time embedding is learned (time_embedding_type='learned'), a table "
            f"of {rows} timesteps, so timestep must be a whole number from 0 to {rows - 1}, "
            f"got {timestep}")
    return int(timestep), torch.long


def example_inputs(model, batch: int = 2, seed: int = 0, *, height: int | None = None,
                   width: int | None = None, timestep: float | None = None,
                   text_length: int = 77) -> dict:
    """Keyword arguments for ``model(**inputs)``: random latents and text states, one timestep.

    Works for any UNet2DConditionModel or UNet2DModel config, so generated configurations get
    valid inputs too: class labels where the config embeds classes (``num_class_embeds``,
    ``class_embed_type``), the added conditions of its ``addition_embed_type`` (SDXL's text
    and time ids, Kandinsky's image embeddings and hint) and of its ``encoder_hid_dim_type``
    (text states at ``encoder_hid_dim`` for a text projection). ``timestep`` defaults to 500;
    a learned time embedding (``time_embedding_type="learned"``, a table of
    ``num_train_timesteps`` rows) takes a whole timestep in its range, by default the middle
    one, as integers. ``return_dict`` is False.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel

    if not isinstance(model, (UNet2DConditionModel, UNet2DModel)):
        raise FiseditError(
            f"{type(model).__name__} is not a diffusers U-Net; pass a UNet2DConditionModel "
            "or UNet2DModel (for a pipeline, pass pipe.unet)")
    batch = check_int("batch", batch, minimum=1)
    seed = check_seed("seed", seed)
    text_length = check_int("text_length", text_length, minimum=1)
    cfg = model.config
    timestep, timestep_dtype = _example_timestep(cfg, timestep)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    h = None if height is None else check_int("height", height, minimum=1)
    w = None if width is None else check_int("width", width, minimum=1)
    if h is None or w is None:
        configured = latent_size(model)
        h, w = h or configured[0], w or configured[1]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    hint = getattr(getattr(model, "add_embedding", None), "input_hint_block", None)
    # An image hint's embedding has channels the forward concatenates to the sample's, which
    # in_channels counts too.
    channels = cfg.in_channels - (hint[-1].out_channels if hint is not None else 0)
    inputs = {
        "sample": randn(batch, channels, h, w),
        "timestep": torch.full((batch,), timestep, dtype=timestep_dtype, device=device),
        "return_dict": False,
    }
    labels = _class_labels(model, batch, randn)
    if labels is not None:
        inputs["class_labels"] = labels.to(device)
    if isinstance(model, UNet2DConditionModel):
        width = cfg.cross_attention_dim
        if isinstance(width, (list, tuple)):
            # Given per block; one text tensor feeds every block, so the widths must agree.
            if len(set(width)) != 1:
                raise FiseditError(
                    f"cross_attention_dim={tuple(width)} gives the blocks different text "
                    "widths, which one encoder_hidden_states cannot feed; build the example "
                    "inputs by hand")
            width = width[0]
        projection, projected = cfg.get("encoder_hid_dim_type"), cfg.get("encoder_hid_dim")
        # A text projection reads the states at encoder_hid_dim; an image one reads image
        # embeddings at that width instead (the states are then unread).
        text_width = projected if projection in ("text_proj", "text_image_proj") else width
        inputs["encoder_hidden_states"] = randn(batch, text_length, text_width)
        added = {}
        if projection == "text_image_proj" or cfg.addition_embed_type == "text_image":
            added["image_embeds"] = randn(batch, width)
        if cfg.addition_embed_type == "text_image":
            added["text_embeds"] = randn(batch, width)      # pooled, as Kandinsky 2.1's
        if projection == "image_proj" or cfg.addition_embed_type in ("image", "image_hint"):
            added["image_embeds"] = randn(batch, projected)
        if cfg.addition_embed_type == "image_hint":
            # The hint is an image, which its embedding downsamples by 8 to the latent.
            added["hint"] = randn(batch, 3, h * 8, w * 8)
        if cfg.addition_embed_type == "text_time":
            text_dim = (cfg.projection_class_embeddings_input_dim
                        - 6 * cfg.addition_time_embed_dim)
            time_ids = torch.tensor([h * 8, w * 8, 0, 0, h * 8, w * 8], dtype=dtype)
            added.update(text_embeds=randn(batch, text_dim),
                         time_ids=time_ids.repeat(batch, 1).to(device))
        if added:
            inputs["added_cond_kwargs"] = added
    return inputs


def _class_labels(model, batch: int, randn) -> torch.Tensor | None:
    """The ``class_labels`` ``model``'s class embedding reads (None where it has none):
    indices for ``num_class_embeds``, numbers for a timestep-like embedding, vectors for an
    identity (the time embedding's width) or a projection."""
    cfg = model.config
    kind, count = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    if kind is None:
        return None if count is None else torch.arange(batch) % count
    if kind == "timestep":
        return torch.linspace(100.0, 900.0, batch)
    if kind == "identity":
        return randn(batch, model.time_embedding.linear_2.out_features)
    if kind in ("projection", "simple_projection"):
        return randn(batch, cfg.projection_class_embeddings_input_dim)
    return None


def capture(unet, inputs: dict, frontend: str = "export") -> fx.GraphModule:
    """Capture ``unet`` called with keyword ``inputs`` into an ATen-level GraphModule."""
    check_unet(unet)
    if frontend not in FRONTENDS:
        raise FiseditError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}")
    inputs = dict(tensor_timestep(inputs, unet), return_dict=False)
    # Only the frontend's own call is explained as a forward it cannot take: a failure in our
    # conversion after it is ours and propagates as it is.
    try:
        if frontend == "export":
            with torch.no_grad():
                captured = torch.export.export(unet, (), inputs, strict=False)
        else:
            # diffusers pops T2I-Adapter residuals off their list: the caller's list must
            # survive.
            captured = dynamo_graph(unet, _copy_containers(inputs))
    except FiseditError:
        raise
    except Exception as error:
        raise_if_eager_fails(unet, inputs)
        # The U-Net runs, the capture does not: a forward the frontend cannot take whole.
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UnsupportedGraphError(
            f"{frontend} cannot capture {type(unet).__name__}'s forward as one graph "
            f"({type(error).__name__}: {first_line}); the usual cause is Python control flow "
            "on a tensor's value (if x.mean() > 0) or a call the frontend cannot trace in a "
            "custom block or attention processor: express it with tensor ops (torch.where) "
            "so that the whole forward is one graph (the frontend's error, chained to this "
            "one, shows where)") from error
    if frontend == "export":
        return program_to_graph_module(captured)
    return _with_unread_inputs(lower_dynamo_graph(*captured), inputs)


def _with_unread_inputs(graph_module: fx.GraphModule, inputs: dict) -> fx.GraphModule:
    """Dynamo leaves out of its graph an input the forward never reads (diffusers replaces a
    Kandinsky 2.2 U-Net's text states by its image embeddings' projection); export keeps it.
    Every call passes all its inputs, so the graph takes each of them, as export's does: an
    unused placeholder (with its example's fake value, as export's) for each one missing."""
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    names = {node.name for node in placeholders}
    flat = flatten_inputs(inputs)
    missing = [name for name, value in flat.items()
               if isinstance(value, torch.Tensor) and name not in names]
    if not missing:
        return graph_module
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    # Each after the last placeholder (the sample is always read, so there is one; get_attr
    # nodes may come before them): the graph's inputs are its placeholders in order.
    anchor = placeholders[-1]
    for name in missing:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        anchor.meta["val"] = mode.from_tensor(flat[name])
    graph_module.meta[INPUTS] = [*graph_module.meta[INPUTS], *missing]
    graph.lint()
    graph_module.recompile()
    return graph_module


def raise_if_eager_fails(unet, inputs: dict) -> None:
    """After a failed capture or recorded run: if the U-Net fails on ``inputs`` when simply
    called, the inputs are the problem, not the capture, and the U-Net's own error (not the
    frontend's, from fake tensors, with their logs; nor a frame of a generated graph) says
    which; raise it as a FiseditError. Runs the U-Net once, on this failure path only. (Fake
    tensors carry no values, so an error that depends on them, an out-of-range class label,
    shows only when the recorded graph runs.)"""
    try:
        with torch.no_grad():
            unet(**_copy_containers(inputs))
    except Exception as error:  # noqa: BLE001 - whatever it is, it is the U-Net's own failure
        raise FiseditError(f"the U-Net itself fails on these inputs: {type(error).__name__}: "
                           f"{error} (correct the inputs so that unet(**inputs) runs; "
                           "where no inputs can, diffusers cannot run this U-Net's config)"
                           f"{_attention_mask_hint(inputs)}") from error


def _attention_mask_hint(inputs: dict) -> str:
    """A hint for the likeliest cause where an ``attention_mask`` was given: diffusers applies
    it to the self-attentions over the image's tokens at every attention level (whose counts
    differ), so a mask meant for the text tokens fails there."""
    if inputs.get("attention_mask") is None:
        return ""
    return ("; note: attention_mask masks the self-attentions' image tokens at every "
            "attention level, not the text tokens: a mask over the text tokens is "
            "encoder_attention_mask")


def _copy_containers(value):
    """``value`` with its dicts, lists and tuples copied (tensors shared)."""
    if isinstance(value, dict):
        return {key: _copy_containers(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_containers(inner) for inner in value)
    return value


def dynamo_graph(unet, inputs: dict):
    """The single graph (and its example inputs) Dynamo hands a backend for ``unet(**inputs)``."""
    seen = {}

    def grab(graph_module, example_inputs):
        seen["graph"] = (graph_module, example_inputs)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=grab, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(**inputs)
    torch._dynamo.reset()
    return seen["graph"]


def lower_dynamo_graph(graph_module: fx.GraphModule, example_inputs, arg_names=None,
                       constant_positions=()) -> fx.GraphModule:
    """Lower a Dynamo backend graph to ATen; its module-state placeholders become constants.

    Dynamo passes parameters and buffers as placeholders whose example inputs are the module's
    tensors themselves (``is_module_state``); they become ``get_attr`` nodes holding those same
    tensors, so in-place weight updates stay visible. The remaining placeholders are the user
    inputs, in Dynamo's order: ``gm.meta["fc_input_positions"]`` gives each tensor input's
    position in the backend's call. The placeholders at ``constant_positions`` (Python
    numbers Dynamo made inputs) become constants too, copies of their example values: the
    caller keeps later calls to those values.

    A graph compiled with dynamic shapes also takes symbolic sizes (``SymInt`` placeholders):
    the lowered graph is specialized to the example's concrete sizes, and those inputs are not
    among the positions. Positional arguments of the compiled call (Dynamo names them
    ``args_0``, ``args_1``, ... when a module is called positionally, as pipelines do) are
    named by ``arg_names`` (the forward's parameter names), else ``sample``, ``timestep``
    (the first two of every diffusers U-Net) and ``arg<i>``.
    """
    from torch.fx._lazy_graph_module import _LazyGraphModule

    # Dynamo hands backends lazily compiled graph modules whose forward is ``(*args, **kwargs)``
    # until first called; export names the inputs after forward's signature, so generate it.
    _LazyGraphModule.force_recompile(graph_module)
    example_inputs = [_concrete(x) for x in example_inputs]
    constant_positions = set(constant_positions)
    if constant_positions:
        graph_module = _numbers_read_as_values(graph_module, example_inputs, constant_positions)
    with torch.no_grad():
        program = torch.export.export(graph_module, tuple(example_inputs), strict=False)
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    constants, rename, positions = {}, {}, []
    for position, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if position in constant_positions:      # a fresh tensor each call: its value, kept
            constants[node.name] = example.clone()
        elif is_module_state(node.name, example):
            constants[node.name] = example
        else:
            rename[node.name] = dynamo_input_name(node.name, arg_names)
            if isinstance(example, torch.Tensor):
                positions.append(position)
    result = program_to_graph_module(program, extra_constants=constants, rename=rename)
    result.meta[INPUT_POSITIONS] = positions
    return result


def _numbers_read_as_values(graph_module: fx.GraphModule, example_inputs,
                            positions) -> fx.GraphModule:
    """A copy of a Dynamo graph in which the Python numbers at ``positions`` (the 0-d tensors
    Dynamo passes for them) are their example values wherever the graph reads them back as
    numbers (``.item()``): export would trace a symbolic float there, which no pass follows.
    (A copy: the graph itself still runs dense calls with the numbers they pass.)"""
    graph = copy.deepcopy(graph_module.graph)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for position in positions:
        value = example_inputs[position].item()
        for reader in list(placeholders[position].users):
            if reader.op == "call_method" and reader.target == "item":
                for user in list(reader.users):
                    user.args, user.kwargs = fx.node.map_arg(
                        (user.args, user.kwargs), lambda node: value if node is reader else node)
                graph.erase_node(reader)
    return fx.GraphModule(graph_module, graph)


_POSITIONAL_DEFAULTS = ("sample", "timestep")


def is_module_state(placeholder: str, example) -> bool:
    """Whether a Dynamo graph placeholder is the module's own state rather than a call input:
    a parameter, or a buffer (the latent upscaler's and score-SDE's resampling kernels), which
    Dynamo names after ``self``, never a keyword a U-Net is called with."""
    return (isinstance(example, torch.nn.Parameter)
            or dynamo_input_name(placeholder).startswith("self_"))


def dynamo_input_name(name: str, arg_names=None) -> str:
    for prefix in ("l_kwargs_", "l_args_", "l_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.rstrip("_") or name
    if name.isdigit():   # a positional argument of the compiled call
        index = int(name)
        names = list(arg_names) if arg_names is not None else list(_POSITIONAL_DEFAULTS)
        name = names[index] if index < len(names) else f"arg{index}"
    return name


def _concrete(value):
    """A Dynamo example input with symbolic sizes replaced by their concrete hints."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise FiseditError("a dynamic-shape graph input has no concrete example value; "
                               "compile with dynamic=False")
        return int(hint)
    return value


def program_to_graph_module(program, extra_constants=None, rename=None) -> fx.GraphModule:
    """A plain GraphModule from an ExportedProgram: lifted parameters become ``get_attr`` nodes.

    ``extra_constants`` maps user-input names that are really constants (Dynamo's parameter
    placeholders) to their tensors; ``rename`` renames the remaining user inputs.
    """
    from torch.export.graph_signature import InputKind

    program = _functional(program)
    extra_constants = extra_constants or {}
    rename = rename or {}
    root = torch.nn.Module()
    source = program.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    state = {**program.state_dict, **program.constants}
    specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
    user_inputs = []
    for index, node in enumerate(source.graph.nodes):
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT and node.name not in extra_constants:
                if not isinstance(node.meta.get("val"), torch.Tensor):
                    continue  # return_dict and other constant flags: baked into the graph
                name = rename.get(node.name, node.name)
                new = graph.placeholder(name)
                user_inputs.append(name)
            else:
                value = (extra_constants[node.name] if node.name in extra_constants
                         else state[spec.target])
                attr = f"c{index}_{node.name}"
                _register(root, attr, value)
                new = graph.get_attr(attr)
            new.meta.update(node.meta)
            env[node] = new
        elif node.op == "output":
            outputs = node.args[0]
            if len(outputs) != 1:
                raise FiseditError(
                    f"the U-Net graph returns {len(outputs)} values; expected one sample tensor")
            graph.output(env[outputs[0]])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    result = fx.GraphModule(root, graph)
    result.meta[INPUTS] = user_inputs
    return result


def _functional(program):
    """``program`` without in-place ops.

    Export's graph keeps in-place ops (diffusers adds T2I-Adapter residuals with ``sample +=``),
    and one that writes into a value the record graph stores would change the recording after
    the fact, and into a value the edit graph reads from the cache, the cache itself. Export's
    own functionalisation (``run_decompositions`` with an empty table: no op is decomposed)
    rewrites them out of place, every later use reading the new value. It runs only for graphs
    that have such ops, so every other graph is captured exactly as before. A U-Net that writes
    into one of its inputs is refused: an edit could not replay that write.
    """
    if not any(_mutates(node) for node in program.graph.nodes):
        return program
    program = program.run_decompositions({})
    mutated = program.graph_signature.user_inputs_to_mutate
    if mutated:
        raise FiseditError(
            f"the U-Net writes in place into its input(s) {sorted(set(mutated.values()))}; "
            "fisedit cannot replay writes into the caller's tensors: pass copies the U-Net "
            "may own, or make the write out of place")
    return program


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _register(root: torch.nn.Module, name: str, value) -> None:
    if isinstance(value, torch.nn.Parameter):
        root.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        root.register_buffer(name, value)
    else:
        setattr(root, name, value)
