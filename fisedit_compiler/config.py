"""SparseConfig: the user's choices for compiling a U-Net into a sparse engine."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from .checks import check_bool, check_choice, check_float, check_int
from .errors import FiseditError

# Whether Triton can be imported, and whether its CPU interpreter is on (TRITON_INTERPRET=1,
# which tests/conftest.py sets before triton is first imported). The kernels read these too.
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

GROUP_NORM_POLICIES = ("incremental", "cached")
FRONTENDS = ("export", "dynamo")        # capture's frontends (compiler/capture.py)
ATTENTION_POLICIES = ("full", "sparse")
KERNELS = ("auto", "triton", "torch")
# The dtypes the Triton kernels take (they accumulate in fp32); a float64 U-Net runs the torch
# reference, which computes in float64.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernels_take(dtype: torch.dtype | None) -> bool:
    """Whether the Triton kernels take ``dtype`` (None: not known yet, as at compile)."""
    return dtype is None or dtype in KERNEL_DTYPES


CONV_METHODS = ("implicit", "gather")


@dataclass(frozen=True)
class SparseConfig:
    """How edits are computed.

    group_norm: ``incremental`` (exact: statistics of the mixed tensor) or ``cached`` (SIGE and
        FISEdit: the recorded statistics of the same step).
    self_attention: ``full`` (exact: recorded K/V with the active rows replaced) or ``sparse``
        (FISEdit's fast mode: active queries attend to active tokens only).
    tile: output tile side at every level, or one value per level (finest first; the last
        value repeats for further levels, and values past a U-Net's levels are unused, so one
        config serves U-Nets of any depth); the effective masks are unions of these tiles. The
        default (4, 2, 1) halves the tile per level: a 4x4 tile is a quarter of an 8x8 level,
        so coarse tiles there would inflate a 1% edit to most of the low levels, while the
        Triton kernels compute exactly the active pixels whatever the tile, and 4x4 tiles at
        the finest level keep its group-norm tile statistics small.
    dilation: latent pixels by which the edit mask grows before tiling (edits spread through
        convolutions; exactness against the oracle holds for any value).
    dense_threshold: a level whose active fraction exceeds this runs dense, and so do the
        levels below it; one value, or one per level (finest first; a tuple's last value
        repeats, values past the U-Net's levels are unused), e.g. measured by
        ``engine.cost_model.calibrate``. The default, 0.5 for the finest level and 0.75 below,
        follows the calibrations on an H200 (SD1.5: 0.47-0.52 then 0.73-0.80, RESULTS.md
        sessions 8-9): a coarse level turning dense under a sparse finest level costs more
        than it saves, since the plan then pays both paths.
    frontend: ``export`` or ``dynamo`` capture.
    check_inputs: verify on each edit that the inputs equal the recorded ones outside the mask.
    kernels: ``auto`` (Triton kernels on CUDA, the torch reference elsewhere and for float64),
        ``torch`` (the reference everywhere) or ``triton`` (Triton everywhere; on CPU only
        under ``TRITON_INTERPRET=1``, for tests; fp16, bf16 and fp32 only).
    cuda_graphs: on CUDA, run edit steps as CUDA graphs (no per-op launch overhead): plans
        are made for capacity buckets, and one graph per bucket, captured once
        (``SparseEngine.prepare``), replays every mask of the bucket.
    bucket_ratio: the growth of level 0's capacity from one bucket to the next (> 1): fewer
        buckets (less to capture) against more padding (at most this factor on level 0).
    group_projections: run the linears that read one tensor (each attention's Q, K and V; the
        cross-attentions' K and V of the text) as one GEMM over their concatenated weights
        (``passes.group_linears``): fewer small GEMMs per step, for a copy of those weights
        (fp16: SD1.5 113 MB, 6.6% of its weights; SDXL 1.30 GB, 25%; RESULTS.md).
    hoist_pass_constants: compute what depends only on the inputs an edit pass holds fixed (the
        cross-attentions' K/V of the text, added conditions, an image hint's encoder) once per
        pass instead of at every step (``passes.hoist_pass_constants``): at each pass's first
        step, and again on a later step whose inputs or weights changed by a write torch
        counts (in-place ops, new tensors; not ``.data`` or NumPy views: ``engine.pass_values``).
        Off, they are computed at every step.
    fold_text_queries: fold each cross-attention's query projection into its text keys, once
        per pass (``passes.fold_text_queries``; needs ``hoist_pass_constants``, else it is not
        applied): one kernel per cross-attention and step where there were three, for the
        folded keys' memory (``B x heads x T x C`` values each, kept twice on the CUDA-graph
        path: at batch 2 in fp16 SD1.5 31 MB). Only where the folded keys read at most 1 MiB
        more than the query weight, counted at CFG batch 2 in fp16 whatever the program's
        (SD1.5's do; SDXL's do not: folded, its 5% step was 0.14-0.2 ms slower). It changes
        results by rounding only; a 5% SD1.5 step 0.09 ms faster in a pass on the H100
        (benchmarks/RESULTS.md, sessions 26-27).
    conv_method: how the Triton path runs a sparse conv (``kernels.sparse_conv.sparse_conv2d``):
        ``gather`` (the mixed input's taps as a dense matrix, then cuBLAS and the epilogue:
        three launches, 1.3-2.6x faster than one implicit-GEMM launch at SD1.5's shapes) or
        ``implicit`` (one implicit-GEMM launch; faster only on the smallest convs, and needs
        no temporary: gather's tap matrix for SDXL's widest conv with half of its 128x128
        level active is 16384 x 8640 fp16 values, 283 MB by its shape).
    """

    group_norm: str = "incremental"
    self_attention: str = "full"
    tile: int | tuple[int, ...] = (4, 2, 1)
    dilation: int = 1
    dense_threshold: float | tuple[float, ...] = (0.5, 0.75)
    frontend: str = "export"
    check_inputs: bool = False
    kernels: str = "auto"
    cuda_graphs: bool = True
    bucket_ratio: float = 1.25
    group_projections: bool = True
    hoist_pass_constants: bool = True
    fold_text_queries: bool = True
    conv_method: str = "gather"

    def __post_init__(self):
        check_choice("SparseConfig.group_norm", self.group_norm, GROUP_NORM_POLICIES)
        check_choice("SparseConfig.self_attention", self.self_attention, ATTENTION_POLICIES)
        check_choice("SparseConfig.frontend", self.frontend, FRONTENDS)
        check_choice("SparseConfig.kernels", self.kernels, KERNELS)
        check_choice("SparseConfig.conv_method", self.conv_method, CONV_METHODS)
        if self.kernels == "torch" and self.conv_method != SparseConfig.conv_method:
            # The torch reference runs every sparse conv one way: the choice would be ignored.
            raise FiseditError(
                f"SparseConfig.conv_method={self.conv_method!r} chooses how the Triton kernels "
                f"run a sparse conv, but kernels='torch' runs none; drop conv_method or use "
                f"kernels='auto'")
        # Lists are taken as tuples (the config is hashed: engines key their programs by it).
        self._normalize("tile", lambda value, name: check_int(name, value, minimum=1))
        self._normalize("dense_threshold",
                        lambda value, name: check_float(name, value, minimum=0.0, maximum=1.0))
        object.__setattr__(self, "dilation",
                           check_int("SparseConfig.dilation", self.dilation, minimum=0))
        bucket_ratio = check_float("SparseConfig.bucket_ratio", self.bucket_ratio)
        if bucket_ratio <= 1:
            raise FiseditError(f"SparseConfig.bucket_ratio must be a number > 1, got "
                               f"{self.bucket_ratio!r}")
        object.__setattr__(self, "bucket_ratio", bucket_ratio)     # a float, as it is hashed
        for flag in ("check_inputs", "cuda_graphs", "group_projections", "hoist_pass_constants",
                     "fold_text_queries"):
            check_bool(f"SparseConfig.{flag}", getattr(self, flag))

    def _normalize(self, field_name: str, check) -> None:
        """A per-level field: one value, or a non-empty tuple (or list) of values."""
        value = getattr(self, field_name)
        name = f"SparseConfig.{field_name}"
        if isinstance(value, (tuple, list)):
            if not value:
                raise FiseditError(f"{name} must be one value or a non-empty tuple of them "
                                   "(one per level, finest first)")
            value = tuple(check(item, f"{name}[{i}]") for i, item in enumerate(value))
        else:
            value = check(value, name)
        object.__setattr__(self, field_name, value)

    def tiles_for(self, levels: list[tuple[int, int]]) -> list[int]:
        """The tile side of each level, clipped to the level's size."""
        tiles = _per_level(self.tile, len(levels))
        return [max(1, min(t, max(size))) for t, size in zip(tiles, levels)]

    def thresholds_for(self, levels: list[tuple[int, int]]) -> list[float]:
        """The dense threshold of each level (a tuple's last value repeats, as for ``tile``)."""
        return [float(t) for t in _per_level(self.dense_threshold, len(levels))]

    def use_triton(self, device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
        """Whether edit graphs on ``device`` (of ``dtype``, where known) run the Triton
        kernels; a dtype outside ``KERNEL_DTYPES`` runs the torch reference."""
        if self.kernels == "torch" or not HAS_TRITON or not kernels_take(dtype):
            return False
        if self.kernels == "triton":
            return torch.device(device).type == "cuda" or INTERPRET
        return torch.device(device).type == "cuda"


def _per_level(value, count: int) -> tuple:
    """One value per level from a value or a tuple whose last value repeats."""
    values = value if isinstance(value, tuple) else (value,)
    return (values + (values[-1],) * (count - len(values)))[:count]
