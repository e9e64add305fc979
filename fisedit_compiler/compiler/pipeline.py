"""The compile pipeline: a captured U-Net graph through the passes to a Program.

``trace`` captures a U-Net (``capture``) and runs the front passes (``canonical_graph``:
canonicalize, fold_attention, fold_slice_writes, then analyze); ``build_program`` takes that
analyzed canonical graph through the sparse passes (sparsify, fuse, fuse_tokens,
group_linears, fold_text_queries, lower_kernels where Triton runs, hoist_pass_constants) and
derives the cache set and the record graph; ``Program.dense_graph`` is the canonical graph
tuned for dense runs (``tune_dense``). SparseEngine and the "fisedit" backend both compile
through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import config as config_module
from ..config import SparseConfig
from ..errors import FiseditError
from ..execution.derived_weights import DerivedWeights
from ..graph_keys import DERIVED_WEIGHTS, INPUTS, LEVELS, PASS_CONSTANTS, SPARSE_MODES
from ..passes.analyze import analyze
from ..passes.cache import CacheEntry, cache_writes, derive_cache_set, insert_cache_writes
from ..passes.canonicalize import canonicalize
from ..passes.fuse import fuse
from ..passes.fold_attention import fold_attention
from ..passes.fold_slice_writes import fold_slice_writes
from ..passes.fold_text_queries import fold_text_queries
from ..passes.fuse_tokens import fuse_tokens
from ..passes.group_linears import group_linears
from ..passes.hoist_pass_constants import hoist_pass_constants
from ..passes.lower_kernels import lower_kernels
from ..passes.sparsify import sparsify
from ..passes.tune_dense import tune_dense
from .capture import capture

STAGES = ("captured", "canonical")


def trace(unet, inputs: dict, frontend: str = "export", stage: str = "canonical") -> fx.GraphModule:
    """Capture ``unet(**inputs)`` and run the front passes up to ``stage``.

    ``captured`` is the ATen graph of the frontend; ``canonical`` is that graph in the ``ir``
    dialect, annotated by ``passes.analyze`` (domains, levels, MACs, invariance).
    """
    if stage not in STAGES:
        raise FiseditError(f"unknown stage {stage!r}; choose one of {STAGES}")
    gm = capture(unet, inputs, frontend)
    return gm if stage == "captured" else canonical_graph(gm)


def canonical_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A captured ATen graph in the ``ir`` dialect, annotated by ``passes.analyze`` (domains,
    levels, MACs, invariance)."""
    return analyze(fold_slice_writes(fold_attention(canonicalize(gm))))


@dataclass
class Program:
    """Everything compiled for one input signature."""
    signature: tuple
    canonical: fx.GraphModule
    record: fx.GraphModule
    edit: fx.GraphModule
    entries: list[CacheEntry]
    levels: list[tuple[int, int]]
    tiles: list[int]

    @property
    def input_names(self) -> list[str]:
        return self.canonical.meta[INPUTS]

    @property
    def modes(self) -> dict[str, str]:
        """How each canonical node runs in edits: "sparse", "dense", "global" or "input"."""
        return self.edit.meta[SPARSE_MODES]

    @property
    def cache_writes(self) -> dict[str, list[str]]:
        """Per canonical node name, the cache keys recorded from it."""
        return cache_writes(self.entries)

    @property
    def output_key(self) -> str:
        """The cache key of the recorded U-Net output."""
        return self.canonical.graph.output_node().args[0].name

    @property
    def derived(self) -> DerivedWeights:
        """The program's derived weight copies (packed conv weights, grouped projections),
        shared by its edit graph and its dense graph."""
        return getattr(self.edit, DERIVED_WEIGHTS)

    @property
    def pass_constants(self) -> fx.GraphModule | None:
        """The graph of the values an edit pass computes once, called with the fixed inputs it
        names as placeholders (``passes.hoist_pass_constants``); None when there are none."""
        return getattr(self.edit, PASS_CONSTANTS, None)

    def dense_graph(self) -> fx.GraphModule:
        """The canonical graph tuned for dense runs (``passes.tune_dense``), reading the
        program's derived copies; a new graph on each call (the engine compiles it once)."""
        return tune_dense(self.canonical, self.derived)


def build_program(signature: tuple, shared: fx.GraphModule, config: SparseConfig) -> Program:
    """The one compile path after capture, shared by SparseEngine and the "fisedit" backend.

    ``shared`` is an analyzed canonical graph (``trace`` or the backend's lowering of
    a Dynamo graph); no pass changes it (each returns a new graph), so it may serve several
    configs as it is.
    """
    canonical = shared
    edit = fuse_tokens(fuse(sparsify(canonical, config)))
    if config.group_projections:
        edit = group_linears(edit)
    if config.fold_text_queries and config.hoist_pass_constants:
        edit = fold_text_queries(edit)
    if check_kernels(config, device_of(signature), dtype_of(signature)):
        edit = lower_kernels(edit, config.conv_method)
    if config.hoist_pass_constants:
        edit = hoist_pass_constants(edit)
    if not hasattr(edit, DERIVED_WEIGHTS):      # no pass needed copies: the dense graph may
        edit.add_submodule(DERIVED_WEIGHTS, DerivedWeights())
    entries = derive_cache_set(edit)
    record = insert_cache_writes(canonical, entries, config)
    levels = canonical.meta[LEVELS]
    return Program(signature, canonical, record, edit, entries, levels, config.tiles_for(levels))


def check_kernels(config: SparseConfig, device, dtype: torch.dtype | None = None) -> bool:
    """Whether edit graphs on ``device`` of ``dtype`` run the Triton kernels
    (``SparseConfig.use_triton``); refuses ``kernels="triton"`` where Triton cannot run, which
    ``use_triton`` answers with the torch reference: an explicit request must not be dropped
    without a word."""
    if config.kernels != "triton" or config.use_triton(device, dtype):
        return config.use_triton(device, dtype)
    if not config_module.kernels_take(dtype):
        where = f"{str(dtype).replace('torch.', '')} tensors (they take fp16, bf16 and fp32)"
        why = "the torch reference computes in float64"
    else:
        where = str(torch.device(device))
        why = ("triton is not installed" if not config_module.HAS_TRITON else
               "Triton runs on CUDA devices, and on the CPU only under TRITON_INTERPRET=1 (set "
               "before triton is first imported; slow, for tests)")
    raise FiseditError(
        f"SparseConfig(kernels='triton') asks for the Triton kernels, but they cannot run on "
        f"{where}: {why}; use kernels='auto' (Triton where it runs, the torch reference "
        "elsewhere) or kernels='torch'")


def _sample_entry(signature: tuple) -> tuple | None:
    """The signature's (name, shape, dtype, device) of the sample, which sets where and in what
    dtype a U-Net call computes (a 0-d timestep may stay on the host, in another dtype: the
    U-Net moves and casts it itself); else its first input's; None for no inputs."""
    entries = {entry[0]: entry for entry in signature}
    return entries.get("sample", next(iter(entries.values()), None))


def device_of(signature: tuple) -> torch.device:
    """The device a U-Net call runs on (its sample's; the CPU for no inputs)."""
    entry = _sample_entry(signature)
    return torch.device("cpu" if entry is None else entry[3])


def dtype_of(signature: tuple) -> torch.dtype:
    """The dtype a U-Net call computes in (its sample's; float32 for no inputs)."""
    entry = _sample_entry(signature)
    return torch.float32 if entry is None else entry[2]


def describe_signature_change(got: tuple, before: tuple, before_name: str = "the recording"
                              ) -> str:
    """What differs between signature ``got`` and ``before`` (``before_name``'s), for a
    refusal: each input whose shape, dtype or device differs (a timestep given as a number or
    a 0-d tensor where a ``[batch]`` tensor was recorded, a half-precision sample) and the
    inputs a call adds or drops, in the signature's order (the sample first). Both full
    signatures would leave the reader to find the one difference among a dozen inputs."""
    now = {name: rest for name, *rest in got}
    then = {name: rest for name, *rest in before}
    parts = [f"{name} is {_describe_input(*now[name])} where {before_name} has "
             f"{_describe_input(*then[name])}"
             for name in now if name in then and now[name] != then[name]]
    for verb, names in (("adds", now.keys() - then.keys()), ("drops", then.keys() - now.keys())):
        if names:
            parts.append(f"the call {verb} {', '.join(sorted(names))} (an argument such as "
                         "ControlNet residuals or an added condition is given at one call and "
                         "not at the other)")
    return "; ".join(parts)


def _describe_input(shape, dtype, device) -> str:
    return f"{list(shape)} {str(dtype).replace('torch.', '')} on {device}"
