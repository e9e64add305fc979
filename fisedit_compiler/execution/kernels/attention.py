"""Attention of the active queries over a (possibly mixed) key/value set.

(docs/design.md, "Sparse ops" and "Kernels".)

``attention`` is a flash-style Triton kernel (online softmax, fp32 accumulation) beside its
torch specification ``attention_reference``. With recorded K/V it implements the exact ``full``
self-attention policy: key ``j`` is the new row ``k[:, :, key_position[j]]`` where
``key_position[j] >= 0`` (the level's ``LevelPlan.position``) and the recorded row
``k_recorded[:, :, j]`` elsewhere. The kernel reads both tensors in place, so the mixed K/V
(``scatter_full`` in the reference runtime: a clone of the recorded tensors per layer and step)
is never materialised.
"""

from __future__ import annotations

import math

import torch

from ...errors import FiseditError
from . import (HAS_TRITON, INTERPRET, accumulation_dtype, autotune_options, launch_options,
               mix_positions, multiprocessors)
from .recorded_shift import check_recorded_shift, shift_launch_args

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel
    from .recorded_shift import shifted

    # Shared memory one launch may use, with a margin for what the estimate below leaves out.
    _SHARED_BUDGET = 192 * 1024

    def _configs():
        """One small config under the interpreter (it runs every program in Python); on the GPU
        a handful spanning small-query (tens of active tokens) to dense (4096) launches. The
        first is the smallest and fits every supported head dim and dtype."""
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1)]
        shapes = [(16, 32, 4, 2), (16, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3),
                  (128, 32, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in shapes]

    def _prune_configs(configs, named_args, **kwargs):
        """Drop query blocks far larger than the query count (they only waste lanes) and
        configs whose pipelined K/V blocks would overflow shared memory (large head dims: the
        autotuner only skips those when another config runs, so never leave it none)."""
        limit = max(16, named_args["q_bucket"])
        row_bytes = kwargs["BLOCK_D"] * named_args["q"].element_size()

        def fits(config):
            blocks = config.kwargs["BLOCK_M"] + 2 * config.kwargs["BLOCK_N"] * config.num_stages
            return config.kwargs["BLOCK_M"] <= limit and blocks * row_bytes <= _SHARED_BUDGET

        return [config for config in configs if fits(config)] or configs[:1]

    @triton.jit
    def _key_rows(new, recorded, position, offs_n, n_mask, offs_d, d_mask,
                  s_new_l, s_new_d, s_rec_l, s_rec_d, MIXED: tl.constexpr, ALIGN: tl.constexpr):
        """A [BLOCK_N, BLOCK_D] block of keys (or values): rows of ``new``, or with MIXED the
        new row where ``position >= 0`` and the recorded row elsewhere."""
        cols = offs_d[None, :]
        if MIXED:
            # Choose each row's source by pointer, so one load serves both tensors.
            new_rows = tl.multiple_of(position * s_new_l, ALIGN)
            recorded_rows = tl.multiple_of(offs_n * s_rec_l, ALIGN)
            pointers = tl.where((position >= 0)[:, None],
                                new + new_rows[:, None] + cols * s_new_d,
                                recorded + recorded_rows[:, None] + cols * s_rec_d)
        else:
            pointers = new + tl.multiple_of(offs_n * s_new_l, ALIGN)[:, None] + cols * s_new_d
        return tl.load(pointers, mask=n_mask[:, None] & d_mask[None, :], other=0.0)

    @triton.autotune(configs=_configs(),
                     key=["q_bucket", "keys_per_split", "HEAD_DIM", "MIXED", "SPLIT"],
                     prune_configs_by={"early_config_prune": _prune_configs},
                     **autotune_options())
    # The query count follows the mask: not specialized on (Triton would compile a variant per
    # divisibility class), so a new mask does not recompile; tuning is per power-of-two bucket.
    @triton.jit(do_not_specialize=["q_len", "q_bucket"])
    def _attention_kernel(q, k, v, k_rec, v_rec, shift_ptr, key_position, out, partial, stats,
                          q_len, n_keys, keys_per_split, heads, qk_scale, q_bucket,
                          sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
                          sv_b, sv_h, sv_l, sv_d, skr_b, skr_h, skr_l, skr_d,
                          svr_b, svr_h, svr_l, svr_d, so_b, so_h, so_l, so_d,
                          MIXED: tl.constexpr, SHIFTED: tl.constexpr,
                          RECORDED_BYTES: tl.constexpr, SPLIT: tl.constexpr,
                          PRECISION: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, PDL: tl.constexpr):
        """Program (query block, batch * heads, split): BLOCK_M queries of one (batch, head)
        against keys [split * keys_per_split, +keys_per_split). Without SPLIT (one split) it
        writes the output; with SPLIT the unnormalised result and its softmax statistics,
        which ``_combine_kernel`` merges.

        HEAD_DIM is a compile-time constant so the head-dim mask is known to the compiler and
        rows load in wide vectors (a runtime 40 would force element-wise loads). ALIGN, a power
        of two dividing every stride but the last, says the same of where rows and heads
        start: Triton only knows a runtime stride divides by 16, so SD1.5's heads of 40
        channels (a head stride of 40) read element by element without it, 4x slower than
        SDPA at the finest level (RESULTS.md, session 10)."""
        wait_for_previous_kernel(PDL)
        batch_head = tl.program_id(1)
        split = tl.program_id(2)
        b = batch_head // heads
        h = batch_head % heads
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < q_len
        q_rows = tl.multiple_of(b * sq_b + h * sq_h + offs_m * sq_l, ALIGN)
        queries = tl.load(q + q_rows[:, None] + offs_d[None, :] * sq_d,
                          mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        k += tl.multiple_of(b * sk_b + h * sk_h, ALIGN)
        v += tl.multiple_of(b * sv_b + h * sv_h, ALIGN)
        k_rec = shifted(k_rec, shift_ptr, SHIFTED, RECORDED_BYTES)
        v_rec = shifted(v_rec, shift_ptr, SHIFTED, RECORDED_BYTES)
        k_rec += tl.multiple_of(b * skr_b + h * skr_h, ALIGN)
        v_rec += tl.multiple_of(b * svr_b + h * svr_h, ALIGN)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        key_start = split * keys_per_split
        key_end = tl.minimum(key_start + keys_per_split, n_keys)
        for start in range(key_start, key_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < key_end
            if MIXED:
                position = tl.load(key_position + offs_n, mask=n_mask, other=-1)
            else:
                position = offs_n
            keys = _key_rows(k, k_rec, position, offs_n, n_mask, offs_d, d_mask,
                             sk_l, sk_d, skr_l, skr_d, MIXED, ALIGN)
            values = _key_rows(v, v_rec, position, offs_n, n_mask, offs_d, d_mask,
                               sv_l, sv_d, svr_l, svr_d, MIXED, ALIGN)
            # Scores in the log2 domain (qk_scale includes log2(e)) so the softmax uses exp2.
            scores = tl.dot(queries, tl.trans(keys), input_precision=PRECISION) * qk_scale
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            correction = tl.exp2(row_max - new_max)
            weights = tl.exp2(scores - new_max[:, None])
            row_sum = row_sum * correction + tl.sum(weights, 1)
            acc = acc * correction[:, None] + tl.dot(weights.to(values.dtype), values,
                                                     input_precision=PRECISION)
            row_max = new_max
        mask = m_mask[:, None] & d_mask[None, :]
        if SPLIT:
            row = (split * tl.num_programs(1) + batch_head) * q_len + offs_m
            tl.store(partial + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask)
            tl.store(stats + 2 * row, row_max, mask=m_mask)
            tl.store(stats + 2 * row + 1, row_sum, mask=m_mask)
        else:
            out_rows = tl.multiple_of(b * so_b + h * so_h + offs_m * so_l, ALIGN)
            tl.store(out + out_rows[:, None] + offs_d[None, :] * so_d,
                     (acc / row_sum[:, None]).to(out.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["q_len"])
    def _combine_kernel(partial, stats, out, q_len, heads, splits, so_b, so_h, so_l, so_d,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        ALIGN: tl.constexpr, PDL: tl.constexpr):
        """Program (query block, batch * heads): merge the splits' partial softmaxes (each
        rescaled to the common running maximum) and normalise."""
        wait_for_previous_kernel(PDL)
        batch_head = tl.program_id(1)
        b = batch_head // heads
        h = batch_head % heads
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for split in range(splits):
            row = (split * tl.num_programs(1) + batch_head) * q_len + offs_m
            split_max = tl.load(stats + 2 * row, mask=m_mask, other=0.0)
            # Padding rows read a sum of 1, which keeps their (unstored) division finite.
            split_sum = tl.load(stats + 2 * row + 1, mask=m_mask, other=1.0)
            split_acc = tl.load(partial + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask,
                                other=0.0)
            new_max = tl.maximum(row_max, split_max)
            old_weight = tl.exp2(row_max - new_max)
            split_weight = tl.exp2(split_max - new_max)
            row_sum = row_sum * old_weight + split_sum * split_weight
            acc = acc * old_weight[:, None] + split_acc * split_weight[:, None]
            row_max = new_max
        out_rows = tl.multiple_of(b * so_b + h * so_h + offs_m * so_l, ALIGN)
        tl.store(out + out_rows[:, None] + offs_d[None, :] * so_d,
                 (acc / row_sum[:, None]).to(out.dtype.element_ty), mask=mask)


def _check_inputs(q, k, v, k_recorded, v_recorded, key_position) -> bool:
    """Validate shapes, dtypes and devices; returns whether the keys are the mixed set."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise FiseditError(f"attention: {name} must be [B, H, L, D], got {tuple(tensor.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise FiseditError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                           f"[B, H, L, D] with B, H, D of q {tuple(q.shape)}")
    recorded = (k_recorded, v_recorded, key_position)
    if any(t is None for t in recorded) != all(t is None for t in recorded):
        raise FiseditError("attention: pass k_recorded, v_recorded and key_position together")
    mixed = k_recorded is not None
    tensors = [q, k, v] + ([k_recorded, v_recorded] if mixed else [])
    if any(t.dtype != q.dtype or t.device != q.device for t in tensors):
        raise FiseditError("attention: q, k, v (and the recorded K/V) need one dtype and device")
    if mixed:
        if key_position.device != q.device:
            raise FiseditError("attention: key_position must be on q's device")
        if k_recorded.shape != v_recorded.shape or k_recorded.dim() != 4 or \
                k_recorded.shape[:2] != q.shape[:2] or k_recorded.shape[3] != q.shape[3]:
            raise FiseditError(f"attention: recorded K/V {tuple(k_recorded.shape)}, "
                               f"{tuple(v_recorded.shape)} must be [B, H, N, D] matching q")
        if key_position.shape != (k_recorded.shape[2],) or \
                key_position.dtype not in (torch.int32, torch.int64):
            raise FiseditError(f"attention: key_position must be int32/int64 [N="
                               f"{k_recorded.shape[2]}], got {key_position.dtype} "
                               f"{tuple(key_position.shape)}")
    if (k_recorded if mixed else k).shape[2] == 0:
        raise FiseditError("attention: no keys to attend to")
    return mixed


def attention_reference(q, k, v, scale=None, k_recorded=None, v_recorded=None,
                        key_position=None):
    """softmax(q k^T * scale) v in fp32 (fp64 for fp64 inputs) over k's rows, or over the
    mixed K/V when recorded K/V are given; ``scale`` None means 1 / sqrt(D), as in
    F.scaled_dot_product_attention."""
    if _check_inputs(q, k, v, k_recorded, v_recorded, key_position):
        k = mix_positions(k, k_recorded, key_position, 2)
        v = mix_positions(v, v_recorded, key_position, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    scores = q.to(acc) @ k.to(acc).transpose(-1, -2) * scale
    return (torch.softmax(scores, dim=-1) @ v.to(acc)).to(q.dtype)


# Programs per SM the key split aims at. More splits shorten each program's chain of key
# blocks but give the merge kernel more partial rows to read: on SD1.5 at 5% (H100) 4 or 8
# per SM took the self-attention kernels 0.02-0.03 ms less and the step no less than 2 did
# (benchmarks/RESULTS.md, session 29); ``gpu_run.sh split-ab`` times them.
PROGRAMS_PER_SM = 2


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: ``PROGRAMS_PER_SM`` per SM on a GPU; few under the
    interpreter, so toy tests take the split path too."""
    if INTERPRET:
        return 16
    return PROGRAMS_PER_SM * multiprocessors(device)


# Keys per split are a multiple of this (which every BLOCK_N divides), so no block of keys
# straddles two splits.
_SPLIT_KEYS = 32 if INTERPRET else 256


def _key_split(q_len: int, batch_heads: int, n_keys: int, device) -> tuple[int, int]:
    """``(splits, keys_per_split)``: split the keys across programs when the (query block,
    batch, head) programs alone would leave most of the GPU idle, as for small edits (tens of
    queries, each program otherwise streaming all 4096 keys of a level on its own)."""
    programs = triton.cdiv(q_len, 64) * batch_heads
    splits = min(triton.cdiv(_target_programs(device), programs), n_keys // _SPLIT_KEYS)
    if splits <= 1:
        return 1, n_keys
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), _SPLIT_KEYS) * _SPLIT_KEYS
    return triton.cdiv(n_keys, keys_per_split), keys_per_split


def _stride_alignment(*tensors) -> int:
    """The largest power of two, up to 16, dividing every stride but the last of ``tensors``:
    in elements, how the kernel may assume its rows and heads start aligned."""
    align = 16
    for tensor in tensors:
        for stride in tensor.stride()[:-1]:
            while stride % align:
                align //= 2
    return align


def attention(q, k, v, scale=None, k_recorded=None, v_recorded=None, key_position=None,
              recorded_shift=None):
    """Triton version of ``attention_reference``; q/k/v may be strided views (e.g. permutes).

    fp32 inputs use exact fp32 dot products (not TF32) so they match the reference closely.
    The output is [B, H, Lq, D] in q's dtype, stored as the permuted view of a contiguous
    [B, Lq, H, D] tensor: the attention block's next step, ``permute(0, 2, 1, 3).reshape(B,
    Lq, H * D)`` for the output projection, is then a free view instead of a copy kernel. With
    few queries the keys are split across programs and a second small kernel merges the partial
    results.

    ``recorded_shift`` (``kernels.recorded_shift``): the recorded K/V are read that many bytes
    from their given addresses (a CUDA graph's static store standing for the step it
    replays); None reads them in place.
    """
    mixed = _check_inputs(q, k, v, k_recorded, v_recorded, key_position)
    if recorded_shift is not None and not mixed:
        raise FiseditError("attention: recorded_shift moves the recorded K/V; pass it with "
                           "k_recorded, v_recorded and key_position, or not at all")
    check_recorded_shift(recorded_shift, q, "attention")
    batch, heads, q_len, head_dim = q.shape
    out = torch.empty((batch, q_len, heads, head_dim), dtype=q.dtype,
                      device=q.device).permute(0, 2, 1, 3)
    if q_len == 0:
        return out
    if not mixed:
        # The kernel ignores these without MIXED; any tensors do as placeholders.
        k_recorded, v_recorded, key_position = k, v, k
    n_keys = k_recorded.shape[2] if mixed else k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    splits, keys_per_split = _key_split(q_len, batch * heads, n_keys, q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    align = _stride_alignment(q, k, v, k_recorded, v_recorded, out)
    if splits > 1:
        partial = torch.empty(splits, batch * heads, q_len, head_dim, dtype=torch.float32,
                              device=q.device)
        stats = torch.empty(splits, batch * heads, q_len, 2, dtype=torch.float32,
                            device=q.device)
    else:
        partial = stats = out  # unused without SPLIT

    def grid(meta):
        return triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads, splits

    shift, is_shifted, recorded_bytes = shift_launch_args(recorded_shift, k_recorded)
    _attention_kernel[grid](
        q, k, v, k_recorded, v_recorded, shift, key_position, out, partial, stats,
        q_len, n_keys, keys_per_split, heads, scale * math.log2(math.e),
        triton.next_power_of_2(q_len),
        *q.stride(), *k.stride(), *v.stride(), *k_recorded.stride(), *v_recorded.stride(),
        *out.stride(),
        MIXED=mixed, SHIFTED=is_shifted, RECORDED_BYTES=recorded_bytes, SPLIT=splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HEAD_DIM=head_dim, BLOCK_D=block_d, ALIGN=align, **launch_options(q))
    if splits > 1:
        _combine_kernel[(triton.cdiv(q_len, 16), batch * heads)](
            partial, stats, out, q_len, heads, splits, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=16, ALIGN=align, **launch_options(q))
    return out
