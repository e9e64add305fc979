"""Cross-attention to the text with the query projection folded into the keys.

(docs/design.md, "Sparse ops" and "Kernels"; the rewrite is ``passes.fold_text_queries``.)

A cross-attention head scores a token row ``x`` against the text's keys ``K_h`` through the
query projection: ``(x Wq_h^T) K_h^T * scale``, which equals ``x (scale * K_h Wq_h)^T``. The
text, hence ``K_h``, is fixed for a whole edit pass, so ``fold_keys_reference`` computes the
*folded keys* ``scale * K_h Wq_h`` (``[B, H, T, C]``) once per pass and every step scores the
rows against them directly: the query GEMM, and the copy that put its output into heads, are
gone from the step. ``text_attention`` is then softmax over the T text tokens and the product
with the values, per head, in one Triton launch beside its torch specification
``text_attention_reference``; its output ``[B, H, N, D]`` is stored as the permuted view of a
contiguous ``[B, N, H, D]`` tensor, so the output projection's reshape is a free view.
"""

from __future__ import annotations

import math

import torch

from ...errors import FiseditError
from . import (HAS_TRITON, INTERPRET, accumulation_dtype, launch_options, multiprocessors,
               shared_memory)

# The kernel holds every text token's score of a row block at once, and the head's values in
# shared memory and registers: CLIP's 77 tokens (and T5's up to 256) fit, and a head's values
# up to 64 KiB (fp16 heads of 256 channels at 77 tokens; fp32 ones of 128), where its smallest
# blocks fit the device's shared memory (``supported``). Longer texts and wider heads run the
# reference.
MAX_TOKENS = 256
MAX_HEAD_DIM = 256
MAX_VALUE_BYTES = 64 * 1024
# The shared memory assumed where the kernel runs off a GPU (the interpreter): an H100's.
_INTERPRETER_SHARED_BYTES = 227 * 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel

    # The query count follows the mask: not specialised on, so a new mask does not recompile.
    @triton.jit(do_not_specialize=["rows"])
    def _text_attention_kernel(x, keys, values, out, rows, tokens, heads,
                               sx_b, sx_n, sx_c, sk_b, sk_h, sk_t, sk_c, sv_b, sv_h, sv_t, sv_d,
                               so_b, so_h, so_n, so_d, CHANNELS: tl.constexpr,
                               HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """Program (row block, batch * heads): the block's scores against the head's folded
        keys (a loop over the channels), their softmax over the tokens, times the values."""
        wait_for_previous_kernel(PDL)
        batch_head = tl.program_id(1)
        b = batch_head // heads
        h = batch_head % heads
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_t = tl.arange(0, BLOCK_T)
        m_mask = offs_m < rows
        t_mask = offs_t < tokens
        x += b * sx_b
        keys += b * sk_b + h * sk_h
        scores = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        for start in range(0, CHANNELS, BLOCK_C):
            offs_c = start + tl.arange(0, BLOCK_C)
            c_mask = offs_c < CHANNELS
            block = tl.load(x + offs_m[:, None] * sx_n + offs_c[None, :] * sx_c,
                            mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            folded = tl.load(keys + offs_t[:, None] * sk_t + offs_c[None, :] * sk_c,
                             mask=t_mask[:, None] & c_mask[None, :], other=0.0)
            scores += tl.dot(block, tl.trans(folded), input_precision=PRECISION)
        # Softmax over the tokens in the log2 domain (exp2), padding tokens excluded.
        scores = tl.where(t_mask[None, :], scores * 1.4426950408889634, float("-inf"))
        weights = tl.exp2(scores - tl.max(scores, 1)[:, None])
        weights = weights / tl.sum(weights, 1)[:, None]
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        head_values = tl.load(values + b * sv_b + h * sv_h + offs_t[:, None] * sv_t
                              + offs_d[None, :] * sv_d,
                              mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        result = tl.dot(weights.to(head_values.dtype), head_values, input_precision=PRECISION)
        tl.store(out + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d,
                 result.to(out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _check_inputs(x, keys, values):
    if x.dim() != 3 or keys.dim() != 4 or values.dim() != 4:
        raise FiseditError(f"text_attention: x must be [B, N, C], keys [B, H, T, C] and values "
                           f"[B, H, T, D]; got {tuple(x.shape)}, {tuple(keys.shape)}, "
                           f"{tuple(values.shape)}")
    if keys.shape[0] != x.shape[0] or keys.shape[3] != x.shape[2] or \
            values.shape[:3] != keys.shape[:3]:
        raise FiseditError(f"text_attention: keys {tuple(keys.shape)} and values "
                           f"{tuple(values.shape)} must share B, H, T, and keys the B and C of "
                           f"x {tuple(x.shape)}")
    if keys.shape[2] == 0:
        raise FiseditError("text_attention: no text tokens to attend to")
    if keys.dtype != x.dtype or values.dtype != x.dtype:
        raise FiseditError(f"text_attention: x, keys and values need one dtype, got {x.dtype}, "
                           f"{keys.dtype}, {values.dtype}")


def fold_keys_reference(k: torch.Tensor, query_weight: torch.Tensor, scale) -> torch.Tensor:
    """The folded keys ``scale * K_h Wq_h`` of each head, ``[B, H, T, C]``, in k's dtype
    (computed in the accumulation dtype): ``k`` is ``[B, H, T, D]``, ``query_weight`` the
    query projection's ``[H * D, C]`` weight, ``scale`` None means ``1 / sqrt(D)``."""
    heads, head_dim = k.shape[1], k.shape[3]
    if query_weight.dim() != 2 or query_weight.shape[0] != heads * head_dim:
        raise FiseditError(f"fold_keys: the query weight {tuple(query_weight.shape)} must be "
                           f"[H * D = {heads * head_dim}, C] for keys {tuple(k.shape)}")
    scale = head_dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(k.dtype)
    per_head = query_weight.to(acc).reshape(heads, head_dim, query_weight.shape[1])
    return (k.to(acc) @ per_head * scale).to(k.dtype)


def text_attention_reference(x, keys, values):
    """``softmax(x keys_h^T) values_h`` for every head h, ``[B, H, N, D]``, computed in the
    accumulation dtype (the scale is in the folded keys)."""
    _check_inputs(x, keys, values)
    acc = accumulation_dtype(x.dtype)
    scores = x.to(acc)[:, None] @ keys.to(acc).transpose(-1, -2)
    return (torch.softmax(scores, dim=-1) @ values.to(acc)).to(x.dtype)


def padded_block(size: int) -> int:
    """The kernel's block along a dim of ``size``: a power of two, at least tl.dot's 16."""
    return max(16, 1 << (size - 1).bit_length())


def launch_shape(rows: int, batch_heads: int, channels: int, tokens: int, head_dim: int,
                 item_size: int, programs: int, shared_bytes: int) -> tuple[int, int, int]:
    """The kernel's (BLOCK_M, BLOCK_C, warps) for ``rows`` query rows of each of
    ``batch_heads`` heads, on a GPU of ``programs`` multiprocessors with ``shared_bytes`` of
    shared memory per program; values of ``item_size`` bytes.

    Every row block reads its head's folded keys, so the row block grows (16 up to 128 rows)
    until the grid no longer exceeds one program per multiprocessor: few rows keep 16-row
    blocks and many programs reading at once, many rows and heads (SDXL's 20 at 1280 channels)
    stop re-reading the keys from L2 for every 16 rows. Wide channels take 128 of them per
    step, with 8 warps. Where many tokens' scores or a wide head's outputs fill the registers
    the row block stops at 32 (and in fp32, whose wide blocks spill registers), and a block
    that would not fit in shared memory shrinks (see ``_shared_bytes``). Measured on an H100
    in fp16, inputs read from DRAM
    (benchmarks/micro_text_attention.py, RESULTS.md session 27). Small blocks under the
    interpreter (every program runs in Python)."""
    if INTERPRET:
        return 16, 16, 4
    wide = padded_block(tokens) > 128 or padded_block(head_dim) > 128
    largest = 32 if wide or item_size > 2 else 128
    block_m = 16
    while block_m < largest and math.ceil(rows / block_m) * batch_heads > programs:
        block_m *= 2
    block_c = 128 if channels >= 640 else 64
    while (_shared_bytes(block_m, block_c, tokens, head_dim, item_size) > shared_bytes
           and (block_c > 64 or block_m > 16)):
        if block_c > 64:
            block_c //= 2
        else:
            block_m //= 2
    return block_m, block_c, 8 if block_c == 128 or block_m == 128 else 4


# The pipelined row and key blocks' stages (Triton's default, which the launch keeps).
_STAGES = 3
# What Triton allocates beside the larger of the two below (4 KiB seen; sm_86, sm_90).
_SHARED_MARGIN = 8 * 1024


def _shared_bytes(block_m: int, block_c: int, tokens: int, head_dim: int, item_size: int) -> int:
    """A program's shared memory, bounded from above: every stage of the row and folded-key
    blocks, or the head's values, which reuse that memory after the loop (Triton 3.9's
    compiles for sm_86 and sm_90), plus a margin."""
    block_t = padded_block(tokens)
    pipelined = _STAGES * (block_m + block_t) * block_c
    return item_size * max(pipelined, block_t * padded_block(head_dim)) + _SHARED_MARGIN


def device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, shared memory one program may use) of ``device``: one program and an
    H100's shared memory off the GPU (the interpreter)."""
    if device.type != "cuda":
        return 1, _INTERPRETER_SHARED_BYTES
    return multiprocessors(device), shared_memory(device)


def supported(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel takes these text lengths, head dims and dtypes on their device: at
    most ``MAX_TOKENS`` and ``MAX_HEAD_DIM``, ``MAX_VALUE_BYTES`` of a head's values, and its
    smallest blocks fit the device's shared memory (else run the reference)."""
    tokens, head_dim, item = keys.shape[2], values.shape[3], values.element_size()
    value_bytes = padded_block(tokens) * padded_block(head_dim) * item
    return (tokens <= MAX_TOKENS and head_dim <= MAX_HEAD_DIM and value_bytes <= MAX_VALUE_BYTES
            and _shared_bytes(16, 64, tokens, head_dim, item)
            <= device_limits(values.device)[1])


def text_attention(x, keys, values):
    """Triton version of ``text_attention_reference`` (``supported`` shapes only)."""
    _check_inputs(x, keys, values)
    if not supported(keys, values):
        raise FiseditError(f"text_attention: at most {MAX_TOKENS} text tokens, head dims of "
                           f"{MAX_HEAD_DIM} and {MAX_VALUE_BYTES} bytes of a head's values, in "
                           f"blocks that fit the device's shared memory (got "
                           f"{keys.shape[2]} tokens, {values.shape[3]} channels of "
                           f"{values.dtype}); use text_attention_reference")
    batch, rows, channels = x.shape
    heads, tokens, head_dim = keys.shape[1], keys.shape[2], values.shape[3]
    out = torch.empty((batch, rows, heads, head_dim), dtype=x.dtype,
                      device=x.device).permute(0, 2, 1, 3)
    if rows == 0:
        return out
    block_m, block_c, warps = launch_shape(rows, batch * heads, channels, tokens, head_dim,
                                           x.element_size(), *device_limits(x.device))
    _text_attention_kernel[(math.ceil(rows / block_m), batch * heads)](
        x, keys, values, out, rows, tokens, heads, *x.stride(), *keys.stride(),
        *values.stride(), *out.stride(), CHANNELS=channels, HEAD_DIM=head_dim,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m,
        BLOCK_C=block_c, BLOCK_T=padded_block(tokens), BLOCK_D=padded_block(head_dim),
        num_warps=warps, **launch_options(x))
    return out
