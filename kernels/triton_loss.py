"""The ``triton`` backend: the three fused loss ops as Triton kernels.

Importing this module registers, under ``torch.ops.rpo_fast``:

* ``triton_sample_errors(model_pred, target, ref_pred)``: per-sample errors in one pass;
* ``triton_pair_loss(model_err, ref_err, weights, method, loss_type, beta, weight_scale)``: the O(M^2)
  stage (loss, metrics, ``coef = dloss/dmodel_err``);
* ``triton_error_grad(coef, model_pred, target)``: the gradient write.

Semantics are the contract in ``rpo_fast/fake_kernels.py`` (whose fake kernels they use); ``rpo_fast/reference.py``
is the definition the pair stage matches. The ops' backward is registered here, once, in
the one gradient design of every backend: sample_errors' backward is error_grad of the
incoming gradient, pair_loss's scales the coefficients. Arguments are validated for users
by ``rpo_fast/validation.py``; the asserts below only guard the kernels. Launch structure and
the reasons for it are in ``docs/kernels-triton.md``.

The ops are ``torch.library.custom_op`` (opaque to inductor), not ``triton_op``: the Python
wrapper picks a memory layout from the real strides at run time (which a traced
``triton_op`` body could not), the same code runs CPU tensors under ``TRITON_INTERPRET=1``,
and inductor could not fuse anything useful across the boundary anyway (the inputs come
from a convolution, the kernels are bandwidth-bound reductions).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rpo_fast import _types
from rpo_fast.fake_kernels import fake_error_grad, fake_pair_loss, fake_sample_errors

# The codes of rpo_fast/_types.py, as constexprs that the kernels may read.
SFT, DPO, RPO = (tl.constexpr(c) for c in (_types.SFT, _types.DPO, _types.RPO))
SIGMOID, HINGE = tl.constexpr(_types.SIGMOID), tl.constexpr(_types.HINGE)

# Streaming kernels: one block of 1024 elements per loop step, 4 warps (8 elements a
# thread: one 16-byte load per bf16/fp16 input, two per fp32 input).
STREAM_BLOCK = 1024
STREAM_WARPS = 4
# About this many programs per streaming launch (an H100 holds ~2100 resident programs of
# 128 threads: 132 SMs x 16); above it, each program loops over more blocks.
STREAM_TARGET_PROGRAMS = 4096
# The partial-sum reduction and the O(M) loops of the pair stage.
SMALL_BLOCK = 256
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a constexpr: kernels may read it


# --------------------------------------------------------------------------- kernels


@triton.jit
def _work_item(D, chunks, chunk_len):
    """The work item of this program of a (sample, chunk) grid: sample k (and as int64, for
    row offsets) and the chunk's element range [start, end) within the sample."""
    pid = tl.program_id(0)
    k = pid // chunks
    start = (pid % chunks).to(tl.int64) * chunk_len
    return pid, k, k.to(tl.int64), start, tl.minimum(start + chunk_len, D)


@triton.jit
def _partial_sq_err_kernel(
    pred_ptr, target_ptr, ref_ptr, model_part_ptr, ref_part_ptr,
    D, pred_row_stride, target_row_stride, ref_row_stride,
    chunks, chunk_len, divisor,
    HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (sample k, chunk c): sum over d in chunk c of (pred - target)^2 (and of
    (ref - target)^2), over ``divisor``, into partial[k, c]. Reads each input element once.
    ``divisor`` is D when a sample is one chunk (the partial is then the error), else 1."""
    pid, k, k64, start, end = _work_item(D, chunks, chunk_len)
    pred_row = pred_ptr + k64 * pred_row_stride
    target_row = target_ptr + k64 * target_row_stride
    ref_row = ref_ptr + k64 * ref_row_stride
    lanes = tl.arange(0, BLOCK)
    # One fp32 accumulator per lane, reduced by a tree at the end: the rounding error grows
    # with chunk_len / BLOCK, not with D.
    model_acc = tl.zeros([BLOCK], dtype=tl.float32)
    ref_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in range(start, end, BLOCK):
        offs = block_start + lanes
        mask = offs < end
        t = tl.load(target_row + offs, mask=mask, other=0.0).to(tl.float32)
        diff = tl.load(pred_row + offs, mask=mask, other=0.0).to(tl.float32) - t
        model_acc += diff * diff
        if HAS_REF:
            rdiff = tl.load(ref_row + offs, mask=mask, other=0.0).to(tl.float32) - t
            ref_acc += rdiff * rdiff
    # A division, not a product with a rounded 1/D: one rounding less, and beta amplifies
    # every rounding of e_model - e_ref.
    tl.store(model_part_ptr + pid, tl.div_rn(tl.sum(model_acc, axis=0), divisor))
    if HAS_REF:
        tl.store(ref_part_ptr + pid, tl.div_rn(tl.sum(ref_acc, axis=0), divisor))


@triton.jit
def _sum_partials_kernel(
    model_part_ptr, ref_part_ptr, model_err_ptr, ref_err_ptr, chunks, divisor,
    HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program k: err[k] = sum_c partial[k, c] / D. A fixed order: deterministic."""
    k = tl.program_id(0)
    base = k.to(tl.int64) * chunks
    lanes = tl.arange(0, BLOCK)
    model_acc = tl.zeros([BLOCK], dtype=tl.float32)
    ref_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, chunks, BLOCK):
        offs = c0 + lanes
        mask = offs < chunks
        model_acc += tl.load(model_part_ptr + base + offs, mask=mask, other=0.0)
        if HAS_REF:
            ref_acc += tl.load(ref_part_ptr + base + offs, mask=mask, other=0.0)
    tl.store(model_err_ptr + k, tl.div_rn(tl.sum(model_acc, axis=0), divisor))
    if HAS_REF:
        tl.store(ref_err_ptr + k, tl.div_rn(tl.sum(ref_acc, axis=0), divisor))


@triton.jit
def _error_grad_kernel(
    coef_ptr, pred_ptr, target_ptr, out_ptr,
    D, pred_row_stride, target_row_stride, out_row_stride,
    chunks, chunk_len, two_over_d,
    BLOCK: tl.constexpr,
):
    """Program (sample k, chunk c): out = coef[k] * 2/D * (pred - target) over chunk c."""
    _, k, k64, start, end = _work_item(D, chunks, chunk_len)
    scale = tl.load(coef_ptr + k) * two_over_d
    pred_row = pred_ptr + k64 * pred_row_stride
    target_row = target_ptr + k64 * target_row_stride
    out_row = out_ptr + k64 * out_row_stride
    lanes = tl.arange(0, BLOCK)
    for block_start in range(start, end, BLOCK):
        offs = block_start + lanes
        mask = offs < end
        p = tl.load(pred_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_row + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + offs, (scale * (p - t)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, accurate for tiny u (Goldberg's correction; no libdevice, so
    the interpreter runs it too)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.div_rn(tl.log(w) * u, tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _loss_and_slope(x, beta, LOSS_TYPE: tl.constexpr):
    """The per-element loss f(x) and f'(x) of docs/loss.md (reference.elementwise_loss)."""
    if LOSS_TYPE == SIGMOID:  # sigmoid: -log(sigmoid(x)) = softplus(-x), stable for any |x|
        e = tl.exp(-tl.abs(x))
        f = tl.maximum(-x, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p(e)
        slope = -tl.div_rn(tl.where(x >= 0, e, 1.0), 1.0 + e)  # -sigmoid(-x)
    elif LOSS_TYPE == HINGE:  # hinge: max(0, 1 - x); slope 0 at the kink, as torch.relu's
        f = tl.maximum(1.0 - x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        slope = tl.where(1.0 - x > 0.0, -1.0, 0.0)
    else:  # ipo: (x / beta - 1 / (2 beta))^2
        u = tl.div_rn(x, beta) - tl.div_rn(0.5, beta)
        f = u * u
        slope = tl.div_rn(2.0 * u, beta)
    return f, slope


@triton.jit
def _is_finite(x):
    return tl.abs(x) <= FLT_MAX  # False for NaN and +-inf


@triton.jit
def _rpo_tile_kernel(
    model_err_ptr, ref_err_ptr, weights_ptr, row_loss_ptr, coef_ptr,
    M, beta, uniform_weight, weight_scale, coef_scale, nan,
    LOSS_TYPE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """The M x M contrast, tiled. Grid (cdiv(M, BLOCK), 2):

    * axis 1 = 0, a row program: winners i of one row tile against every loser j (loop over
      column tiles): row_loss[i] = sum_j f(w_ij z_ij) (NaN when a weight of row i is not
      finite) and coef[i] = -beta/M^2 sum_j f'(w_ij z_ij) w_ij;
    * axis 1 = 1, a column program: losers j of one column tile against every winner
      (loop over row tiles): coef[M + j] = beta/M^2 sum_i f'(w_ij z_ij) w_ij.

    Each program owns its outputs: no atomics, a deterministic result.
    """
    tile = tl.program_id(0)
    is_col = tl.program_id(1) == 1
    own = tile * BLOCK + tl.arange(0, BLOCK)
    own_mask = own < M
    own_idx = tl.where(is_col, M + own, own)  # this program's samples in the (2M,) errors
    own_delta = tl.load(model_err_ptr + own_idx, mask=own_mask, other=0.0) - tl.load(
        ref_err_ptr + own_idx, mask=own_mask, other=0.0
    )
    other_base = tl.where(is_col, 0, M)  # the other side: winners for a column program
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    slope_acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    lanes = tl.arange(0, BLOCK)
    for o0 in range(0, M, BLOCK):
        other = o0 + lanes
        other_mask = other < M
        other_delta = tl.load(model_err_ptr + other_base + other, mask=other_mask, other=0.0) - tl.load(
            ref_err_ptr + other_base + other, mask=other_mask, other=0.0
        )
        # Element [a, b] pairs own sample a with other sample b; as (winner i, loser j):
        # a row program has i = a, j = b; a column program has i = b, j = a.
        dw = tl.where(is_col, other_delta[None, :], own_delta[:, None])
        dl = tl.where(is_col, own_delta[:, None], other_delta[None, :])
        z = beta * (dl - dw)
        mask2 = own_mask[:, None] & other_mask[None, :]
        if HAS_WEIGHTS:
            i = tl.where(is_col, other[None, :], own[:, None]).to(tl.int64)
            j = tl.where(is_col, own[:, None], other[None, :]).to(tl.int64)
            w = tl.load(weights_ptr + i * M + j, mask=mask2, other=0.0) * weight_scale
            bad += tl.sum((mask2 & ~_is_finite(w)).to(tl.int32), axis=1)
        else:
            w = uniform_weight
        f, slope = _loss_and_slope(w * z, beta, LOSS_TYPE)
        loss_acc += tl.sum(tl.where(mask2, f, 0.0), axis=1)
        slope_acc += tl.sum(tl.where(mask2, slope * w, 0.0), axis=1)
    sign = tl.where(is_col, 1.0, -1.0)
    tl.store(coef_ptr + own_idx, sign * beta * coef_scale * slope_acc, mask=own_mask)
    row_mask = own_mask & (tl.program_id(1) == 0)
    tl.store(row_loss_ptr + own, tl.where(bad > 0, nan, loss_acc), mask=row_mask)


@triton.jit
def _pair_finish_kernel(
    model_err_ptr, ref_err_ptr, weights_ptr, row_loss_ptr, coef_ptr, loss_ptr, metrics_ptr,
    M, beta, uniform_weight, weight_scale, nan,
    METHOD: tl.constexpr, LOSS_TYPE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: everything O(M) of the pair stage. The loss (sum of row_loss for rpo,
    the diagonal for dpo, the mean error of the winners for sft), the metrics, the
    coefficients of dpo and sft, and the non-finite contract (NaN loss and coef)."""
    lanes = tl.arange(0, BLOCK)
    n = 2 * M
    inv_m = tl.div_rn(1.0, M + 0.0)  # (M may arrive as the constant 1: Triton specializes it)
    model_sum = tl.zeros([BLOCK], dtype=tl.float32)
    ref_sum = tl.zeros([BLOCK], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    for s0 in range(0, n, BLOCK):
        offs = s0 + lanes
        mask = offs < n
        me = tl.load(model_err_ptr + offs, mask=mask, other=0.0)
        model_sum += me
        if METHOD != SFT:
            re = tl.load(ref_err_ptr + offs, mask=mask, other=0.0)
            ref_sum += re
            nonfinite += (mask & ~(_is_finite(me) & _is_finite(re))).to(tl.int32)
    model_mse = tl.sum(model_sum, axis=0) * (0.5 * inv_m)

    if METHOD == SFT:  # sft: mean error of the preferred rows; no finite check (the reference has none)
        win_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, M, BLOCK):
            offs = i0 + lanes
            mask = offs < M
            win_sum += tl.load(model_err_ptr + offs, mask=mask, other=0.0)
        for s0 in range(0, n, BLOCK):
            offs = s0 + lanes
            tl.store(coef_ptr + offs, tl.where(offs < M, inv_m, 0.0), mask=offs < n)
        loss = tl.sum(win_sum, axis=0) * inv_m
        tl.store(loss_ptr, loss)
        tl.store(metrics_ptr + 0, nan)
        tl.store(metrics_ptr + 1, nan)
        tl.store(metrics_ptr + 2, model_mse)
        tl.store(metrics_ptr + 3, nan)
        tl.store(metrics_ptr + 4, nan)
    else:
        acc_sum = tl.zeros([BLOCK], dtype=tl.float32)
        margin_sum = tl.zeros([BLOCK], dtype=tl.float32)
        loss_sum = tl.zeros([BLOCK], dtype=tl.float32)
        wdiag_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, M, BLOCK):
            i = i0 + lanes
            mask = i < M
            dw = tl.load(model_err_ptr + i, mask=mask, other=0.0) - tl.load(ref_err_ptr + i, mask=mask, other=0.0)
            dl = tl.load(model_err_ptr + M + i, mask=mask, other=0.0) - tl.load(
                ref_err_ptr + M + i, mask=mask, other=0.0
            )
            z = beta * (dl - dw)
            hit = tl.where(z > 0.0, 1.0, tl.where(z == 0.0, 0.5, 0.0))
            acc_sum += tl.where(mask, hit, 0.0)
            margin_sum += tl.where(mask, tl.div_rn(z, beta), 0.0)
            if METHOD == DPO:  # dpo: the loss and coef live on the diagonal
                f, slope = _loss_and_slope(z, beta, LOSS_TYPE)
                loss_sum += tl.where(mask, f, 0.0)
                tl.store(coef_ptr + i, -beta * inv_m * slope, mask=mask)
                tl.store(coef_ptr + M + i, beta * inv_m * slope, mask=mask)
            else:
                row_loss = tl.load(row_loss_ptr + i, mask=mask, other=0.0)
                loss_sum += row_loss
                # NaN rows: a non-finite weight (the tile kernel's mark) or 0 * inf
                nonfinite += (row_loss != row_loss).to(tl.int32)
                if HAS_WEIGHTS:
                    wdiag_sum += tl.load(weights_ptr + i.to(tl.int64) * (M + 1), mask=mask, other=0.0) * weight_scale
        if METHOD == DPO:
            loss = tl.sum(loss_sum, axis=0) * inv_m
            weight_diag = nan
        else:
            loss = tl.sum(loss_sum, axis=0) * (inv_m * inv_m)
            if HAS_WEIGHTS:
                weight_diag = tl.sum(wdiag_sum, axis=0) * inv_m
            else:
                weight_diag = uniform_weight
        num_nonfinite = tl.sum(nonfinite, axis=0)
        tl.store(loss_ptr, tl.where(num_nonfinite == 0, loss, nan))
        tl.store(metrics_ptr + 0, tl.sum(acc_sum, axis=0) * inv_m)
        tl.store(metrics_ptr + 1, tl.sum(margin_sum, axis=0) * inv_m)
        tl.store(metrics_ptr + 2, model_mse)
        tl.store(metrics_ptr + 3, tl.sum(ref_sum, axis=0) * (0.5 * inv_m))
        tl.store(metrics_ptr + 4, weight_diag)
        if num_nonfinite > 0:  # a NaN loss comes with NaN coefficients: no silently finite update
            # dpo's coefficients above were stored by other threads of this program (lane i
            # wrote slots i and M + i): they must land before the NaNs that replace them.
            tl.debug_barrier()
            for s0 in range(0, n, BLOCK):
                offs = s0 + lanes
                tl.store(coef_ptr + offs, tl.full([BLOCK], 0.0, tl.float32) + nan, mask=offs < n)


# --------------------------------------------------------------------------- host side


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _assert_prediction(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """What the streaming kernels rely on (internal: rpo_fast/validation.py validates for users)."""
    torch._check(
        t.dtype in _types.KERNEL_DTYPES and t.shape == like.shape and t.device == like.device and t.dim() >= 1,
        lambda: f"rpo_fast::triton: {name} must be a kernel dtype with the shape and device of model_pred",
    )
    torch._check(
        t.is_cuda or (t.is_cpu and os.environ.get("TRITON_INTERPRET") == "1"),
        lambda: f"rpo_fast::triton: {name} must be a CUDA tensor (or a CPU one under TRITON_INTERPRET=1)",
    )


def _assert_errors(name: str, t: torch.Tensor, n: int) -> None:
    torch._check(
        t.dtype == torch.float32 and t.dim() == 1 and t.shape[0] == n,
        lambda: f"rpo_fast::triton: {name} must be float32 of shape ({n},), got {t.dtype} {tuple(t.shape)}",
    )


def _rows_dense(t: torch.Tensor) -> bool:
    """Each sample t[k] fills a gap-free block of memory (any order inside it): true for
    contiguous and channels_last tensors and for views that slice the batch dimension."""
    # Sorted by stride, the non-unit dimensions of t[k] must tile memory without gaps.
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape[1:], t.stride()[1:]) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _inner_strides(t: torch.Tensor) -> Tuple[int, ...]:
    # Dimensions of size 1 may carry any stride without changing where elements live.
    return tuple(st for size, st in zip(t.shape[1:], t.stride()[1:]) if size != 1)


def _per_sample_layout(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``t`` itself when element d of every sample sits at the same offset as in ``base``
    (so the kernels can walk raw memory), else a copy of ``t`` in ``base``'s layout."""
    if _rows_dense(t) and _inner_strides(t) == _inner_strides(base):
        return t
    d = base[0].numel()
    out = torch.empty_strided(base.shape, (d, *base.stride()[1:]), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _stream_grid(n: int, d: int) -> Tuple[int, int]:
    """(chunks per sample, elements per chunk): about STREAM_TARGET_PROGRAMS programs, each
    a whole number of blocks."""
    blocks = triton.cdiv(d, STREAM_BLOCK)
    blocks_per_program = max(1, triton.cdiv(n * blocks, STREAM_TARGET_PROGRAMS))
    chunk_len = blocks_per_program * STREAM_BLOCK
    return triton.cdiv(d, chunk_len), chunk_len


@torch.library.custom_op("rpo_fast::triton_sample_errors", mutates_args=())
def triton_sample_errors(
    model_pred: torch.Tensor, target: torch.Tensor, ref_pred: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample errors ``mean_d (pred - target)^2`` (float32 ``(N,)``) of model_pred and of
    ref_pred (``(0,)`` when ref_pred is None), from one pass over the inputs."""
    _assert_prediction("model_pred", model_pred, model_pred)
    _assert_prediction("target", target, model_pred)
    if ref_pred is not None:
        _assert_prediction("ref_pred", ref_pred, model_pred)
    n = model_pred.shape[0]
    d = model_pred[0].numel()
    has_ref = ref_pred is not None
    device = model_pred.device
    if d == 0:  # the mean of nothing, as torch's
        nan = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        return nan, (nan.clone() if has_ref else nan.new_empty((0,)))

    pred = model_pred if _rows_dense(model_pred) else model_pred.contiguous()
    target = _per_sample_layout(target, pred)
    ref = _per_sample_layout(ref_pred, pred) if has_ref else pred
    chunks, chunk_len = _stream_grid(n, d)
    model_part = torch.empty((n, chunks), dtype=torch.float32, device=device)
    ref_part = torch.empty((n, chunks) if has_ref else (0,), dtype=torch.float32, device=device)
    with _device_guard(pred):
        _partial_sq_err_kernel[(n * chunks,)](
            pred, target, ref, model_part, ref_part if has_ref else model_part,
            d, pred.stride(0), target.stride(0), ref.stride(0),
            chunks, chunk_len, float(d) if chunks == 1 else 1.0,
            HAS_REF=has_ref, BLOCK=STREAM_BLOCK, num_warps=STREAM_WARPS,
        )
        if chunks == 1:  # the partial sums are already the means
            return model_part.view(n), ref_part.view(n) if has_ref else ref_part
        model_err = torch.empty((n,), dtype=torch.float32, device=device)
        ref_err = torch.empty((n if has_ref else 0,), dtype=torch.float32, device=device)
        _sum_partials_kernel[(n,)](
            model_part, ref_part if has_ref else model_part, model_err, ref_err if has_ref else model_err, chunks, float(d),
            HAS_REF=has_ref, BLOCK=_partials_block(chunks), num_warps=1,
        )
    return model_err, ref_err


def _tile_block(m: int) -> int:
    """Square tile edge of the M x M stage: 16 to 64, the smallest power of two >= M."""
    return max(16, min(64, triton.next_power_of_2(m)))


def _partials_block(chunks: int) -> int:
    """Lanes of _sum_partials_kernel for ``chunks`` partial sums a sample."""
    return min(SMALL_BLOCK, triton.next_power_of_2(chunks))


def _finish_block(n: int) -> int:
    """Lanes of _pair_finish_kernel for ``n`` = 2M samples."""
    return min(SMALL_BLOCK, max(16, triton.next_power_of_2(n)))


@torch.library.custom_op("rpo_fast::triton_pair_loss", mutates_args=())
def triton_pair_loss(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    weights: Optional[torch.Tensor],
    method: int,
    loss_type: int,
    beta: float,
    weight_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The O(M^2) stage: ``(loss 0-d, metrics (5,), coef = dloss/dmodel_err (2M,))``, float32,
    as ``rpo_fast.reference.pair_loss`` defines them (``weight_scale`` multiplies every weight)."""
    n = model_err.shape[0]
    m = n // 2
    _assert_errors("model_err", model_err, 2 * m)
    torch._check(
        m > 0 and method in (_types.SFT, _types.DPO, _types.RPO) and 0 <= loss_type < len(_types.LOSS_TYPES) and beta > 0
        and weight_scale > 0,
        lambda: f"rpo_fast::triton_pair_loss: M > 0, method, loss_type, beta > 0 and weight_scale > 0 in range, got "
        f"M = {m}, {method}, {loss_type}, {beta}, {weight_scale}",
    )
    if method != _types.SFT:
        _assert_errors("ref_err", ref_err, n)
    has_weights = weights is not None and method == _types.RPO
    if has_weights:
        torch._check(weights.shape == (m, m), lambda: f"rpo_fast::triton_pair_loss: weights must be ({m}, {m})")
        weights = weights.to(dtype=torch.float32, device=model_err.device).contiguous()

    model_err = model_err.contiguous()
    ref = ref_err.contiguous() if method != _types.SFT else model_err
    w = weights if has_weights else model_err  # a placeholder pointer, never read
    device = model_err.device
    loss = torch.empty((), dtype=torch.float32, device=device)
    metrics = torch.empty((5,), dtype=torch.float32, device=device)
    coef = torch.empty((n,), dtype=torch.float32, device=device)
    nan = float("nan")
    uniform = weight_scale / m
    with _device_guard(model_err):
        row_loss = coef  # a placeholder pointer unless rpo
        if method == _types.RPO:
            block = _tile_block(m)
            row_loss = torch.empty((m,), dtype=torch.float32, device=device)
            _rpo_tile_kernel[(triton.cdiv(m, block), 2)](
                model_err, ref, w, row_loss, coef,
                m, beta, uniform, weight_scale, 1.0 / (m * m), nan,
                LOSS_TYPE=loss_type, HAS_WEIGHTS=has_weights, BLOCK=block, num_warps=4,
            )
        _pair_finish_kernel[(1,)](
            model_err, ref, w, row_loss, coef, loss, metrics,
            m, beta, uniform, weight_scale, nan,
            METHOD=method, LOSS_TYPE=loss_type, HAS_WEIGHTS=has_weights,
            BLOCK=_finish_block(n), num_warps=4,
        )
    return loss, metrics, coef


@torch.library.custom_op("rpo_fast::triton_error_grad", mutates_args=())
def triton_error_grad(coef: torch.Tensor, model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``coef[k] * 2 * (model_pred[k] - target[k]) / D`` in model_pred's dtype and shape
    (and strides, as ``torch.empty_like`` gives them)."""
    _assert_prediction("model_pred", model_pred, model_pred)
    _assert_prediction("target", target, model_pred)
    n = model_pred.shape[0]
    _assert_errors("coef", coef, n)
    out = torch.empty_like(model_pred)
    d = model_pred[0].numel()
    if d == 0:
        return out
    # empty_like keeps a dense model_pred's strides; a batch dimension that is not the
    # outermost one in memory (rare) is written through a contiguous buffer.
    dest = out if _rows_dense(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    pred = _per_sample_layout(model_pred, dest)
    target = _per_sample_layout(target, dest)
    coef = coef.contiguous()
    chunks, chunk_len = _stream_grid(n, d)
    with _device_guard(dest):
        _error_grad_kernel[(n * chunks,)](
            coef, pred, target, dest,
            d, pred.stride(0), target.stride(0), dest.stride(0),
            chunks, chunk_len, 2.0 / d,
            BLOCK=STREAM_BLOCK, num_warps=STREAM_WARPS,
        )
    if dest is not out:
        out.copy_(dest)
    return out


# --------------------------------------------------------------------------- fake kernels, autograd


def _errors_setup(ctx, inputs, output):
    model_pred, target, _ = inputs
    ctx.save_for_backward(model_pred, target)


def _errors_backward(ctx, grad_model_err, grad_ref_err):
    """d loss / d model_pred = error_grad(d loss / d model_err): the gradient written here."""
    model_pred, target = ctx.saved_tensors
    if grad_model_err is None:
        return None, None, None
    return triton_error_grad(grad_model_err.float().contiguous(), model_pred, target), None, None


def _pair_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _pair_backward(ctx, grad_loss, grad_metrics, grad_coef):
    """d loss / d model_err = coef, scaled by the incoming gradient."""
    (coef,) = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    return coef * grad_loss, None, None, None, None, None, None


triton_sample_errors.register_fake(fake_sample_errors)
triton_pair_loss.register_fake(fake_pair_loss)
triton_error_grad.register_fake(fake_error_grad)
triton_sample_errors.register_autograd(_errors_backward, setup_context=_errors_setup)
triton_pair_loss.register_autograd(_pair_backward, setup_context=_pair_setup)
