"""Fused token ops of the transformer blocks (docs/design.md, "Kernels").

Token tensors of a level already hold only the active positions, so these ops need no gather;
what pays is fusing the memory-bound steps: the residual add with the layer_norm that follows
it (one read of each input, one write of each output), and GEGLU's split, GELU and product.
The stored sum may carry a bias of its own (``sum_bias``, not seen by the norm): the bias of
the linear whose output is later added to it, so that linear can accumulate into the sum
without a bias of its own (``passes.fuse_tokens``).
Rows are all leading dims; the last dim must be contiguous (a copy is made otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import FiseditError
from . import HAS_TRITON, launch_options

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel

    @triton.jit
    def _add_layer_norm_kernel(x, residual, weight, bias, sum_bias, total, normed, width, eps,
                               s_x, s_r, s_t, s_n, HAS_RESIDUAL: tl.constexpr,
                               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_SUM_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                               PDL: tl.constexpr):
        """Program r: total = x + residual of row r (+ sum_bias, stored only), then the layer
        norm of x + residual."""
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        values = tl.load(x + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            values += tl.load(residual + row * s_r + cols, mask=mask, other=0.0).to(tl.float32)
            # Normalise the sum as stored (rounded to the input dtype), as the unfused ops do.
            rounded = values.to(total.dtype.element_ty)
            stored = rounded
            if HAS_SUM_BIAS:
                stored = (rounded.to(tl.float32) + tl.load(sum_bias + cols, mask=mask).to(
                    tl.float32)).to(total.dtype.element_ty)
            tl.store(total + row * s_t + cols, stored, mask=mask)
            values = rounded.to(tl.float32)
        mean = tl.sum(values) / width
        centred = tl.where(mask, values - mean, 0.0)
        y = centred / tl.sqrt(tl.sum(centred * centred) / width + eps)
        if HAS_WEIGHT:
            y *= tl.load(weight + cols, mask=mask).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias + cols, mask=mask).to(tl.float32)
        tl.store(normed + row * s_n + cols, y.to(normed.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_kernel(x, out, width, s_x, s_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (r, block): out = hidden * gelu(gate) with exact (erf) GELU, in fp32."""
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        hidden = tl.load(x + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(x + row * s_x + width + cols, mask=mask, other=0.0).to(tl.float32)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out + row * s_o + cols, (hidden * gelu).to(out.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a [rows, last] view with a unit last-dim stride (copying only if needed)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_add_layer_norm(x, residual, weight, bias, sum_bias=None):
    if x.dim() == 0:
        raise FiseditError("add_layer_norm: x must have a last (feature) dim")
    if sum_bias is not None and residual is None:
        raise FiseditError("add_layer_norm: sum_bias needs a residual (with none, the sum is x "
                           "itself, which is not written)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise FiseditError(f"add_layer_norm: residual {tuple(residual.shape)} {residual.dtype} "
                           f"must match x {tuple(x.shape)} {x.dtype}")
    for name, param in (("weight", weight), ("bias", bias), ("sum_bias", sum_bias)):
        if param is not None and param.shape != x.shape[-1:]:
            raise FiseditError(f"add_layer_norm: {name} must be [{x.shape[-1]}], "
                               f"got {tuple(param.shape)}")


def add_layer_norm_reference(x, residual, weight, bias, eps, sum_bias=None):
    """``(total, normed)``: total = x + residual (x itself when residual is None) and
    normed = layer_norm(total) over the last dim, both in x's dtype; with ``sum_bias`` the
    returned total is ``x + residual + sum_bias`` (the norm is still that of x + residual)."""
    _check_add_layer_norm(x, residual, weight, bias, sum_bias)
    total = x if residual is None else x + residual
    normed = F.layer_norm(total, x.shape[-1:], weight, bias, eps)
    return (total if sum_bias is None else total + sum_bias), normed


def add_layer_norm(x, residual, weight, bias, eps, sum_bias=None):
    """Triton version of ``add_layer_norm_reference``: one program per row."""
    _check_add_layer_norm(x, residual, weight, bias, sum_bias)
    width = x.shape[-1]
    rows = _rows(x)
    total = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_rows = rows if residual is None else _rows(residual)
    total_rows, normed_rows = _rows(total), normed.view(-1, width)
    block = triton.next_power_of_2(width)
    _add_layer_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, normed if weight is None else weight,
        normed if bias is None else bias, normed if sum_bias is None else sum_bias, total_rows,
        normed_rows, width, eps,
        rows.stride(0), residual_rows.stride(0), total_rows.stride(0), normed_rows.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_SUM_BIAS=sum_bias is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
        **launch_options(x))
    return total, normed


def _check_geglu(x):
    if x.dim() == 0 or x.shape[-1] % 2:
        raise FiseditError(f"geglu: the last dim must be even (hidden and gate halves), "
                           f"got shape {tuple(x.shape)}")


def geglu_reference(x):
    """``x[..., :D] * gelu(x[..., D:])``, D = x.shape[-1] // 2, exact GELU (diffusers' GEGLU)."""
    _check_geglu(x)
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def geglu(x):
    """Triton version of ``geglu_reference``."""
    _check_geglu(x)
    width = x.shape[-1] // 2
    rows = _rows(x)
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(width), 1024)
    _geglu_kernel[(rows.shape[0], triton.cdiv(width, block))](
        rows, out, width, rows.stride(0), width, BLOCK=block, **launch_options(x))
    return out
