"""Fused Triton kernels for the few-token steps of decoding and verification on a GPU (T <= 16).

Why: at batch 1 a decode step reads every weight once and does almost no arithmetic, so its
floor is bytes / memory bandwidth. On an H200 the 1.5B model's ~3 GB take ~0.7 ms, but a
28-layer step that launches ~17 kernels per layer pays a ~3-5 us floor for each of them
(notes/gpu_performance.md): the step became kernel-count-bound, not bandwidth-bound. Here a
layer is five kernels plus two for attention, each projection one pass over its weights:

    norm + q/k/v projection + bias        `linear(x, Wqkv, bias, norm=g1)`     [T, H] -> [T, (nh + 2 nkv) hd]
    RoPE on q and k, k/v into the cache   `rope_and_cache(...)`                 -> q [1, nh, T, hd]
    attention over the cache              `attention(q, k_cache, v_cache, mask)` -> [1, nh, T, hd]
    o_proj + residual                     `linear(attn, Wo, residual=x)`        -> [T, H]
    norm + gate/up + SiLU(gate) * up      `linear(x, Wgu, norm=g2, swiglu=True)` -> [T, I]
    down_proj + residual                  `linear(h, Wd, residual=x)`           -> [T, H]

The RMSNorm is folded into the projection that follows it: rmsnorm(x) @ W^T = ((x * g) @ W^T) / rms(x),
and rms(x) is accumulated from the same x tiles the product loads, so the norm costs no extra pass.

Each projection's launch configuration is timed once per shape on the GPU (`_candidates`); for a few
rows (T > 4) one candidate is split-K, two kernels instead of one: partial sums over slices of K, so
that a projection with few output rows (N = 1536) still keeps every multiprocessor reading weights.

Numbers: in float32 the fused step matches Qwen2.forward to ~1e-5 (tests/test_kernels.py runs the
kernels in Triton's CPU interpreter); in bf16 it rounds in different places (the norm and RoPE
stay in float32 longer), like any k-token forward against k 1-token forwards: divergence is
measured, not hidden (bench_gpu reports `fused_logit_check` and `fused_vs_compiled_same_tokens`).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .timing import cuda_time

MAX_T = 16   # the fused path serves steps of at most this many new tokens


# A launch configuration: (dot, acc2d, BT, BN, BK, warps, stages). dot: True = tl.dot on token rows
# padded to BT = 16 (tensor cores, tokens as M); "swap" = tl.dot with the weights as M and the padded
# tokens as N ("swap-AB"); False = multiply-and-sum on CUDA cores over BT = next power of two >= T rows;
# acc2d (T = 1): keep a [BN, BK] running product and sum it once at the end, so the loop carries no
# cross-thread reduction and the next tile's loads are not held up by one; "3d" (T > 1): the same
# with a [BT, BN, BK] running product; "splitk": see _linear_partial_kernel.
# BN output rows per program, BK inputs per loop step. Small BN gives enough programs to keep all 132
# multiprocessors streaming even when N is only 1536. `_pick_config` times the candidates once per
# shape on the GPU (outside any graph capture: the runner's warm-up does it) and keeps the fastest.
def _candidates(T: int, itemsize: int = 2) -> list[tuple]:
    """itemsize: bytes per weight; float32 halves the swap tiles' depth so their pipeline still fits
    the 228 KB of shared memory per multiprocessor."""
    if T == 1:
        return [(False, False, 1, bn, bk, w, st) for bn, bk, w, st in (
            (4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 256, 4, 4), (16, 512, 8, 3),
            (32, 256, 8, 3), (64, 128, 4, 4), (32, 128, 4, 4))] + \
            [(False, True, 1, bn, bk, w, 1) for bn, bk, w in (
                (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 8), (16, 256, 8))]
    bt = triton.next_power_of_2(T)
    fma = [(False, False, bt, bn, max(32, min(1024, 8192 // (bt * bn))), 4, 3) for bn in (4, 8, 16)]
    # "3d": acc2d for a few rows. Each program keeps a [BT, BN, BK] running product and reduces it
    # once after the loop, so the loop never waits on a cross-thread sum. Added after the H200
    # profile of 2026-11-29 (e): the linear kernels took 1.08 ms at T = 1 but 1.50 ms at T = 16, and
    # a 2-token step cost 1.32 target steps, although the weights are read once either way.
    acc3 = [(False, "3d", bt, p // (bt * bk), bk, w, 1) for p, bk, w in ((4096, 256, 4), (8192, 512, 8))
            if 2 <= p // (bt * bk) <= 16]
    dot = [(True, False, MAX_T, bn, bk, 4, st) for bn, bk, st in ((16, 256, 4), (32, 128, 4), (64, 64, 3))]
    # swap-AB: the weights are the M operand (BN = 64 / 128 rows, what Hopper's wgmma wants), the
    # tokens padded to 16 are N. Kept only where the tuner times it faster, so it cannot slow a step.
    swap = [("swap", False, MAX_T, bn, bk * 2 // itemsize, w, st) for bn, bk, w, st in (
        (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 64, 8, 4))]
    # split-K swap-AB (T > 4): a [BN, BK] weight tile times the padded tokens, each program over one of
    # SPLIT slices of K, partial sums in float32, then one small kernel adds them up. With N = 1536 (o_proj,
    # down_proj of the 1.5B) swap-AB alone has 24 programs for 132 multiprocessors; split 8 ways, 192.
    # The acc2d field holds the number of slices.
    splitk = [("splitk", split, MAX_T, bn, bk * 2 // itemsize, w, st) for bn, bk, split, w, st in (
        (64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (128, 64, 4, 8, 3))] if T > 4 else []
    return fma + acc3 + dot + swap + splitk


_chosen: dict[tuple, tuple] = {}   # memo: shape key -> the configuration timed fastest


def _pick_config(key, T: int, launch, itemsize: int = 2) -> tuple:
    if key in _chosen:
        return _chosen[key]
    candidates = _candidates(T, itemsize)
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        _chosen[key] = candidates[3 if T == 1 else 0]
        return _chosen[key]
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"kernel shape {key} was not tuned before CUDA-graph capture: run the step once "
                           "outside the capture first (GraphRunner.capture does this in its warm-up)")
    # subtle: a 1.5B layer's matrices (5-55 MB) fit in the H200's 60 MB L2 cache, so timing repeated
    # launches would pick the configuration fastest at reading L2. In a real step every weight comes
    # from HBM (the model is 50x the L2), so each timed launch follows a 256 MB read that evicts the
    # cache (a read, not a write: written lines would be written back during the timed launch).
    flush = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda")
    times = {}
    for cfg in candidates:
        try:
            times[cfg] = cuda_time(lambda: launch(cfg), reps=9, warmup=1, before=flush.max)
        except triton.runtime.errors.OutOfResources:     # e.g. shared memory: this tile does not fit here
            continue
        except triton.compiler.errors.CompilationError as e:
            # a candidate this GPU's compiler rejects is one the tuner cannot use; tools/gpu_check.py
            # compiles every candidate and fails on it, so it does not pass unseen
            import warnings
            warnings.warn(f"kernels: configuration {cfg} does not compile here ({type(e).__name__}); skipped")
            continue
    if not times:
        raise RuntimeError(f"no launch configuration of the fused linear kernel ran for shape {key}")
    _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def tuned_configs() -> dict:
    """The tuner's picks so far, {"(N, K, rows, swiglu, norm, head dim, bytes per weight)": {field: value}}."""
    fields = ("dot", "acc2d", "BT", "BN", "BK", "warps", "stages")
    return {str(k): dict(zip(fields, v)) for k, v in _chosen.items()}


@triton.jit
def _rows_times_tile(x, w, DOT: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr):
    """x [BT, BK] @ w[BN, BK]^T -> [BT, BN] in float32."""
    if DOT:
        return tl.dot(x, tl.trans(w), input_precision=PREC)
    elif BT == 1:
        return tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    else:
        return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _tiles(x_ptr, g_ptr, w_ptr, rt, rn, k0, tmask, nmask, K: tl.constexpr, BK: tl.constexpr, stride_xt, stride_xh,
           XHD: tl.constexpr, NORM: tl.constexpr):
    """What one loop step multiplies: the tile of x at token rows rt and inputs rk = k0 .. k0 + BK - 1
    ([BT, BK], in the weights' dtype; NORM: scaled by the norm's weight g, its 1/rms comes after the
    product) and the weights' tile at rows rn ([BN, BK]). Also returns rk and the weights' mask (SwiGLU
    loads its up rows with them) and each token row's sum of squares over these inputs."""
    rk = k0 + tl.arange(0, BK)
    kmask = rk < K
    xp = x_ptr + rt[:, None] * stride_xt + (rk // XHD)[None, :] * stride_xh + (rk % XHD)[None, :]
    x = tl.load(xp, mask=tmask[:, None] & kmask[None, :], other=0.0)
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, axis=1)
    if NORM:
        g = tl.load(g_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
        x = (xf * g[None, :]).to(w_ptr.dtype.element_ty)
    wmask = nmask[:, None] & kmask[None, :]
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0.0)
    return x, sq, w, rk, wmask


@triton.jit
def _finish(acc, acc_up, ss, b_ptr, r_ptr, y_ptr, rt, rn, tmask, nmask, N, K: tl.constexpr, eps,
            NORM: tl.constexpr, BIAS: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """After the product: acc [BT, BN] (acc_up: the up rows, SWIGLU) and the rows' sums of squares ss
    [BT] -> y[t, n] = act(acc * 1/rms (NORM) + b) (+ r), stored in y's dtype."""
    if NORM:
        rinv = 1.0 / tl.sqrt(ss / K + eps)                 # [BT]
        acc = acc * rinv[:, None]
        acc_up = acc_up * rinv[:, None]
    if BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up          # silu(gate) * up
    omask = tmask[:, None] & nmask[None, :]
    if RESIDUAL:
        acc += tl.load(r_ptr + rt[:, None] * N + rn[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rt[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr,
                   T, N, K: tl.constexpr, stride_xt, stride_xh, eps,
                   XHD: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr, SWIGLU: tl.constexpr,
                   RESIDUAL: tl.constexpr, DOT: tl.constexpr, ACC2D: tl.constexpr, BT: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, SWAP: tl.constexpr = False,
                   ACC3: tl.constexpr = False, A3T: tl.constexpr = 1, A3N: tl.constexpr = 1,
                   A3K: tl.constexpr = 1):
    """y[t, n] = act(sum_k xn[t, k] W[n, k] + b[n]) (+ r[t, n]) for BN output rows n of this program.

    x[t, k] lives at x_ptr + t * stride_xt + (k // XHD) * stride_xh + k % XHD, so attention's output
    [1, nh, T, hd] is read in place as a [T, nh * hd] matrix (XHD = hd) without a transpose copy.
    NORM: xn = x * g / rms(x[t]); SWIGLU: W is [2N, K] (gate rows, then up rows), y = silu(gate) * up.
    DOT: tl.dot on rows padded to BT = 16; else multiply-and-sum on CUDA cores; PREC: the float32
    dot's precision ("ieee" for float32 weights, where the default tf32 would round).
    ACC3: running products [A3T, A3N, A3K] = [BT, BN, BK], summed once after the loop (else [1, 1, 1]:
    the shape is passed in so that a configuration that does not use it allocates nothing).
    """
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)                        # [BN] output rows
    rt = tl.arange(0, BT)                                   # [BT] token rows
    nmask, tmask = rn < N, rt < T
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    acc_up = tl.zeros((BT, BN), dtype=tl.float32)
    acc2 = tl.zeros((BN, BK), dtype=tl.float32)             # ACC2D: running products (T = 1)
    acc_s = tl.zeros((BN, BT), dtype=tl.float32)            # SWAP: the product transposed, W @ x^T
    acc_s_up = tl.zeros((BN, BT), dtype=tl.float32)
    acc2_up = tl.zeros((BN, BK), dtype=tl.float32)
    acc3 = tl.zeros((A3T, A3N, A3K), dtype=tl.float32)     # ACC3: running products (T > 1)
    acc3_up = tl.zeros((A3T, A3N, A3K), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)                  # sum of squares of x per row (NORM)
    for k0 in range(0, K, BK):
        x, sq, w, rk, wmask = _tiles(x_ptr, g_ptr, w_ptr, rt, rn, k0, tmask, nmask, K, BK, stride_xt, stride_xh,
                                     XHD, NORM)                             # [BT, BK], [BT], [BN, BK]
        if NORM:
            ss += sq
        if ACC2D:
            acc2 += x.to(tl.float32) * w.to(tl.float32)
        elif ACC3:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        elif SWAP:
            acc_s += tl.dot(w, tl.trans(x), input_precision=PREC)
        else:
            acc += _rows_times_tile(x, w, DOT, BT, PREC)
        if SWIGLU:
            u = tl.load(w_ptr + (rn + N)[:, None] * K + rk[None, :], mask=wmask, other=0.0)
            if ACC2D:
                acc2_up += x.to(tl.float32) * u.to(tl.float32)
            elif ACC3:
                acc3_up += x.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :]
            elif SWAP:
                acc_s_up += tl.dot(u, tl.trans(x), input_precision=PREC)
            else:
                acc_up += _rows_times_tile(x, u, DOT, BT, PREC)
    if ACC2D:
        acc = tl.sum(acc2, axis=1)[None, :]
        acc_up = tl.sum(acc2_up, axis=1)[None, :]
    if ACC3:
        acc = tl.sum(acc3, axis=2)
        acc_up = tl.sum(acc3_up, axis=2)
    if SWAP:                                               # transposed once, after the loop
        acc = tl.trans(acc_s)
        acc_up = tl.trans(acc_s_up)
    _finish(acc, acc_up, ss, b_ptr, r_ptr, y_ptr, rt, rn, tmask, nmask, N, K, eps, NORM, BIAS, SWIGLU, RESIDUAL)


@triton.jit
def _linear_partial_kernel(x_ptr, w_ptr, g_ptr, p_ptr, s_ptr, T, N, K: tl.constexpr, stride_xt, stride_xh,
                           XHD: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, BT: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr, PREC: tl.constexpr):
    """Split-K, first half. Program (n, s): BN weight rows times the tokens (padded to BT = 16) over the
    s-th slice of K (KSPLIT inputs), as swap-AB (weights as tl.dot's M operand). Writes the partial sums
    P[s, t, n] in float32 (P[s, t, N + n]: the up rows, SWIGLU) and, program (0, s), S[s, t]: the slice's
    sum of squares of x[t] (NORM). The norm's scale g is applied to x here, its 1/rms after the sum."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rt = tl.arange(0, BT)
    nmask, tmask = rn < N, rt < T
    acc = tl.zeros((BN, BT), dtype=tl.float32)
    acc_up = tl.zeros((BN, BT), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    k_start = pid_s * KSPLIT
    for k0 in range(k_start, k_start + KSPLIT, BK):
        x, sq, w, rk, wmask = _tiles(x_ptr, g_ptr, w_ptr, rt, rn, k0, tmask, nmask, K, BK, stride_xt, stride_xh,
                                     XHD, NORM)                             # [BT, BK], [BT], [BN, BK]
        if NORM:
            ss += sq
        acc += tl.dot(w, tl.trans(x), input_precision=PREC)
        if SWIGLU:
            u = tl.load(w_ptr + (rn + N)[:, None] * K + rk[None, :], mask=wmask, other=0.0)
            acc_up += tl.dot(u, tl.trans(x), input_precision=PREC)
    NP = 2 * N if SWIGLU else N                             # P's row length
    out = p_ptr + pid_s * BT * NP + rt[None, :] * NP + rn[:, None]                 # [BN, BT] of P[s]
    omask = nmask[:, None] & tmask[None, :]
    tl.store(out, acc, mask=omask)
    if SWIGLU:
        tl.store(out + N, acc_up, mask=omask)
    if NORM:
        if pid_n == 0:                                      # every program of slice s has the same ss
            tl.store(s_ptr + pid_s * BT + rt, ss, mask=tmask)


@triton.jit
def _linear_sum_kernel(p_ptr, s_ptr, b_ptr, r_ptr, y_ptr, T, N, K: tl.constexpr, eps, SPLIT: tl.constexpr,
                       NORM: tl.constexpr, BIAS: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                       BT: tl.constexpr, BN: tl.constexpr):
    """Split-K, second half: the slices of P and S summed, then _linear_kernel's ending (_finish)."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rt = tl.arange(0, BT)
    nmask, tmask = rn < N, rt < T
    omask = tmask[:, None] & nmask[None, :]
    NP = 2 * N if SWIGLU else N
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    acc_up = tl.zeros((BT, BN), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for sl in tl.static_range(SPLIT):
        part = p_ptr + sl * BT * NP + rt[:, None] * NP + rn[None, :]
        acc += tl.load(part, mask=omask, other=0.0)
        if SWIGLU:
            acc_up += tl.load(part + N, mask=omask, other=0.0)
        if NORM:
            ss += tl.load(s_ptr + sl * BT + rt, mask=tmask, other=0.0)
    _finish(acc, acc_up, ss, b_ptr, r_ptr, y_ptr, rt, rn, tmask, nmask, N, K, eps, NORM, BIAS, SWIGLU, RESIDUAL)


def linear(x: torch.Tensor, w: torch.Tensor, bias=None, norm=None, eps: float = 1e-6, residual=None,
           swiglu: bool = False, head_dim: int | None = None, config: tuple | None = None) -> torch.Tensor:
    """One fused projection for T <= 16 rows; see `_linear_kernel`.

    x: [T, K] (or attention output [1, nh, T, hd] with head_dim=hd); w: [N, K] ([2N, K] for swiglu);
    bias: [N]; norm: RMSNorm weight [K]; residual: [T, N]. Returns y [T, N] in w's dtype.
    config: force one launch configuration (tests); default: the fastest, timed once per shape.
    """
    if head_dim is None:
        T, K = x.shape
        stride_xt, stride_xh, xhd = x.stride(0), 0, K
    else:
        _, nh, T, hd = x.shape
        K, stride_xt, stride_xh, xhd = nh * hd, x.stride(2), x.stride(1), hd
        if x.stride(3) != 1:
            raise ValueError(f"attention output must be contiguous in head_dim (stride {x.stride(3)}): "
                             "pass .contiguous()")
    if T > MAX_T:
        raise ValueError(f"the fused linear takes at most {MAX_T} rows, got {T}: use torch for larger steps")
    if not w.is_contiguous():
        raise ValueError("weight must be contiguous: pass w.contiguous()")
    if w.shape[1] != K:
        raise ValueError(f"weight has {w.shape[1]} inputs but x has {K}: shapes {tuple(w.shape)} and {tuple(x.shape)}")
    if head_dim is None and x.stride(1) != 1:
        raise ValueError("x must be contiguous along its last dimension: pass x.contiguous()")
    if swiglu and w.shape[0] % 2:
        raise ValueError(f"swiglu needs [2N, K] weights (gate rows, then up rows), got {w.shape[0]} rows")
    N = w.shape[0] // 2 if swiglu else w.shape[0]
    y = torch.empty(T, N, device=w.device, dtype=w.dtype)
    dummy = w   # unused pointer arguments (their branch is compiled out)
    prec = "ieee" if w.dtype == torch.float32 else "tf32"   # float32 weights: no tf32 rounding in tl.dot

    def launch(cfg):
        dot, acc2d, bt, bn, bk, warps, stages = cfg
        if dot == "splitk":
            # K cut into slices of whole BK tiles; the slices' partial sums go through float32 buffers
            kslice = triton.cdiv(triton.cdiv(K, acc2d), bk) * bk
            split = triton.cdiv(K, kslice)
            NP = 2 * N if swiglu else N
            part = torch.empty(split, bt, NP, device=w.device, dtype=torch.float32)
            sums = torch.empty(split, bt, device=w.device, dtype=torch.float32)
            _linear_partial_kernel[(triton.cdiv(N, bn), split)](
                x, w, norm if norm is not None else dummy, part, sums, T, N, K, stride_xt, stride_xh,
                XHD=xhd, NORM=norm is not None, SWIGLU=swiglu, BT=bt, BN=bn, BK=bk, KSPLIT=kslice,
                PREC=prec, num_warps=warps, num_stages=stages)
            _linear_sum_kernel[(triton.cdiv(N, 64),)](
                part, sums, bias if bias is not None else dummy, residual if residual is not None else dummy, y,
                T, N, K, eps, SPLIT=split, NORM=norm is not None, BIAS=bias is not None, SWIGLU=swiglu,
                RESIDUAL=residual is not None, BT=bt, BN=64, num_warps=4)
            return
        _linear_kernel[(triton.cdiv(N, bn),)](
            x, w, bias if bias is not None else dummy, norm if norm is not None else dummy,
            residual if residual is not None else dummy, y, T, N, K, stride_xt, stride_xh, eps,
            XHD=xhd, NORM=norm is not None, BIAS=bias is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
            DOT=dot is True, SWAP=dot == "swap", ACC2D=acc2d is True, BT=bt, BN=bn, BK=bk,
            PREC=prec, ACC3=acc2d == "3d",
            A3T=bt if acc2d == "3d" else 1, A3N=bn if acc2d == "3d" else 1, A3K=bk if acc2d == "3d" else 1,
            num_warps=warps, num_stages=stages)

    key = (N, K, triton.next_power_of_2(T), swiglu, norm is not None, xhd, w.element_size())
    launch(config or _pick_config(key, T, launch, w.element_size()))
    return y


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, T, stride_ch,
                       NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr):
    """Program (t, h): head h of token t in the fused q/k/v row. q heads are rotated into q [nh, T, hd];
    k heads rotated and v heads copied into the cache at slot[t] (cache [nkv, max_len, hd], head
    stride stride_ch). Rotation: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per half."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HD // 2)
    row = qkv_ptr + t * (NH + 2 * NKV) * HD + h * HD
    x1 = tl.load(row + d).to(tl.float32)
    x2 = tl.load(row + HD // 2 + d).to(tl.float32)
    c1 = tl.load(cos_ptr + t * HD + d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * HD + HD // 2 + d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * HD + d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * HD + HD // 2 + d).to(tl.float32)
    is_v = h >= NH + NKV
    o1 = tl.where(is_v, x1, x1 * c1 - x2 * s1)
    o2 = tl.where(is_v, x2, x2 * c2 + x1 * s2)
    slot = tl.load(slot_ptr + t)
    if h < NH:
        dst = q_ptr + h * T * HD + t * HD
    elif h < NH + NKV:
        dst = k_ptr + (h - NH) * stride_ch + slot * HD
    else:
        dst = v_ptr + (h - NH - NKV) * stride_ch + slot * HD
    tl.store(dst + d, o1.to(q_ptr.dtype.element_ty))
    tl.store(dst + HD // 2 + d, o2.to(q_ptr.dtype.element_ty))


def rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """qkv [T, (nh + 2 nkv) hd]; cos, sin [T, hd]; slots [T]; k_cache, v_cache [1, nkv, max_len, hd].
    Writes k, v into the cache; returns q [1, nh, T, hd] rotated."""
    T = qkv.shape[0]
    q = torch.empty(1, nh, T, hd, device=qkv.device, dtype=qkv.dtype)
    if not (k_cache.stride(-1) == 1 and k_cache.stride(-2) == hd and k_cache.stride() == v_cache.stride()):
        raise ValueError(f"k/v caches must be [1, nkv, max_len, {hd}] with contiguous rows and equal strides, "
                         f"got strides {k_cache.stride()} and {v_cache.stride()}")
    _rope_cache_kernel[(T, nh + 2 * nkv)](qkv, cos, sin, slots, q, k_cache, v_cache, T, k_cache.stride(1),
                                          NH=nh, NKV=nkv, HD=hd)
    return q


@triton.jit
def _attention_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr, T, S, stride_ch, scale,
                            NH: tl.constexpr, REP: tl.constexpr, HD: tl.constexpr, BM: tl.constexpr,
                            SPLIT: tl.constexpr, PREC: tl.constexpr):
    """Attention of the T new tokens over key slots [s * SPLIT, (s + 1) * SPLIT) for kv head j.

    Program (j, s). The REP query heads that share kv head j, times T tokens, are the M = REP * T rows
    of one tile (row m = r * T + t; in q [nh, T, hd] they are rows j * M + m), so keys and values
    are read once per group (grouped-query attention). Each program keeps an online softmax over its
    slots and writes its unnormalised output with its running max and sum; `_attention_combine_kernel`
    merges the splits (flash-decoding: enough programs to read the cache in parallel when T is 1).
    """
    j = tl.program_id(0)
    s = tl.program_id(1)
    m_rows = tl.arange(0, BM)
    d = tl.arange(0, HD)
    M = REP * T
    rmask = m_rows < M
    t = m_rows % T
    q = tl.load(q_ptr + (j * M + m_rows)[:, None] * HD + d[None, :], mask=rmask[:, None], other=0.0)
    cols = s * SPLIT + tl.arange(0, SPLIT)
    cmask = cols < S
    k = tl.load(k_ptr + j * stride_ch + cols[:, None] * HD + d[None, :], mask=cmask[:, None], other=0.0)
    v = tl.load(v_ptr + j * stride_ch + cols[:, None] * HD + d[None, :], mask=cmask[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * scale                      # [BM, SPLIT]
    scores += tl.load(mask_ptr + t[:, None] * S + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                      other=float("-inf")).to(tl.float32)
    mx = tl.max(scores, axis=1)                                                        # [BM]
    # subtle: a split the row may not see at all has max -inf; exp against 0 then gives p = 0, not NaN
    p = tl.exp(scores - tl.where(mx == float("-inf"), 0.0, mx)[:, None])
    acc = tl.dot(p.to(v.dtype), v, input_precision=PREC)                                # [BM, HD]
    out_rows = s * NH * T + j * M + m_rows        # partials laid out [n_splits, nh * T, (hd)]
    tl.store(o_ptr + out_rows[:, None] * HD + d[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + out_rows, mx, mask=rmask)
    tl.store(l_ptr + out_rows, tl.sum(p, axis=1), mask=rmask)


@triton.jit
def _attention_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, ROWS, NS, HD: tl.constexpr, NSP: tl.constexpr):
    """Row i of [nh * T] (head h, token t: i = h * T + t): merge the NS splits' partial softmaxes."""
    i = tl.program_id(0)
    sp = tl.arange(0, NSP)
    d = tl.arange(0, HD)
    smask = sp < NS
    mx = tl.load(m_ptr + sp * ROWS + i, mask=smask, other=float("-inf"))
    w = tl.exp(mx - tl.max(mx, axis=0))                                                  # [NSP]
    w = tl.where(smask, w, 0.0)
    l = tl.sum(w * tl.load(l_ptr + sp * ROWS + i, mask=smask, other=0.0), axis=0)
    o = tl.load(o_ptr + (sp * ROWS + i)[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)
    tl.store(out_ptr + i * HD + d, (tl.sum(w[:, None] * o, axis=0) / l).to(out_ptr.dtype.element_ty))


ATTENTION_SPLIT = 64   # key slots per program


def attention(q, k_cache, v_cache, mask) -> torch.Tensor:
    """Grouped-query attention of T <= 16 new tokens over the cache, in two kernels.

    q [1, nh, T, hd] contiguous; k_cache, v_cache [1, nkv, max_len, hd]; mask [T, S] additive (0 or
    -inf), S <= max_len slots attended. Returns [1, nh, T, hd] like F.scaled_dot_product_attention."""
    _, nh, T, hd = q.shape
    nkv, S = k_cache.shape[1], mask.shape[-1]
    rep = nh // nkv
    ns = triton.cdiv(S, ATTENTION_SPLIT)
    f32 = dict(device=q.device, dtype=torch.float32)
    o, mx, l = torch.empty(ns, nh * T, hd, **f32), torch.empty(ns, nh * T, **f32), torch.empty(ns, nh * T, **f32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _attention_split_kernel[(nkv, ns)](q, k_cache, v_cache, mask, o, mx, l, T, S, k_cache.stride(1), hd ** -0.5,
                                       NH=nh, REP=rep, HD=hd, BM=max(16, triton.next_power_of_2(rep * T)),
                                       SPLIT=ATTENTION_SPLIT, PREC=prec, num_warps=4)
    out = torch.empty_like(q)
    _attention_combine_kernel[(nh * T,)](o, mx, l, out, nh * T, ns, HD=hd, NSP=triton.next_power_of_2(ns))
    return out


def one_copy(params) -> torch.Tensor:
    """Parameters whose rows are to be read as one matrix (q/k/v, gate/up), in ONE copy.

    Returns a contiguous [sum of rows, ...] tensor and rebinds each parameter to a view of its rows,
    so the fused kernels and the plain forward read the same memory: fusing adds no bytes (a
    second copy would be ~8.5 GB for the 7B in bf16). Parameters that already are consecutive rows
    of one tensor (fused before) give back that tensor, so fusing twice is free. The one extra
    allocation while fusing is a single layer's matrices.
    subtle: afterwards the model's state_dict holds views sharing storage (safetensors refuses to
    save those as they are: clone them first)."""
    first = params[0].data
    rows = sum(p.shape[0] for p in params)
    offset, consecutive = 0, True
    for p in params:
        consecutive &= (p.is_contiguous() and p.dtype == first.dtype
                        and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                        and p.data_ptr() == first.data_ptr() + offset * first.element_size())
        offset += p.numel()
    if consecutive:
        return first.as_strided((rows, *first.shape[1:]), first.stride())
    # subtle: built outside inference mode, else the parameters would hold inference tensors,
    # which a later training step (or an in-place update) may not touch
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([p.data for p in params]).contiguous()
        start = 0
        for p in params:
            p.data = fused[start:start + p.shape[0]]
            start += p.shape[0]
    return fused


class FusedQwen2:
    """The same forward as `Qwen2.forward` for T <= 16 new tokens, through the fused kernels.

    q/k/v and gate/up are read as one matrix each (`one_copy`: the model's own parameters become
    views of it, no second copy); the other weights are the model's own tensors. Call signature =
    Qwen2.forward, so a GraphRunner or `generate(forward=...)` can use it.
    """

    def __init__(self, model, attention: str = "triton"):
        """attention: "triton" (the two kernels above) or "sdpa" (torch's fused attention)."""
        self.model, c, self.attention = model, model.config, attention
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                wqkv=one_copy([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                bqkv=one_copy([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                wo=a.o_proj.weight, wgu=one_copy([m.gate_proj.weight, m.up_proj.weight]),
                wd=m.down_proj.weight, g1=layer.input_layernorm.weight,
                g2=layer.post_attention_layernorm.weight))

    @property
    def device(self):
        return self.model.device

    def __call__(self, ids, pos, cache, attn_mask, slots, hidden_layers=(), logits=True):
        from .qwen2 import rope_cos_sin
        m, c = self.model, self.model.config
        B, T = ids.shape
        if B != 1 or T > MAX_T:
            raise ValueError(f"the fused path takes batch 1 and at most {MAX_T} new tokens, got {tuple(ids.shape)}")
        n = c.num_hidden_layers
        want = {h % (n + 1) for h in hidden_layers}
        hidden = {}
        x = m.model.embed_tokens(ids[0])                                        # [T, H]
        cos, sin = rope_cos_sin(pos, self.hd, c.rope_theta, x.dtype)            # [1, 1, T, hd]
        cos, sin = cos.reshape(T, self.hd), sin.reshape(T, self.hd)
        mask = torch.where(attn_mask, 0.0, float("-inf")).to(x.dtype)           # [T, S] additive
        S, eps = attn_mask.shape[-1], c.rms_norm_eps
        if 0 in want:
            hidden[0] = x[None]
        for i, w in enumerate(self.layers):
            qkv = linear(x, w["wqkv"], bias=w["bqkv"], norm=w["g1"], eps=eps)   # [T, (nh + 2 nkv) hd]
            q = rope_and_cache(qkv, cos, sin, slots, cache.k[i], cache.v[i], self.nh, self.nkv, self.hd)
            if self.attention == "triton":
                att = attention(q, cache.k[i], cache.v[i], mask)                    # [1, nh, T, hd]
            else:
                att = F.scaled_dot_product_attention(q, cache.k[i][:, :, :S], cache.v[i][:, :, :S],
                                                     attn_mask=mask, enable_gqa=True)
            x = linear(att, w["wo"], residual=x, head_dim=self.hd)             # [T, H]
            h = linear(x, w["wgu"], norm=w["g2"], eps=eps, swiglu=True)         # [T, I]
            x = linear(h, w["wd"], residual=x)                                  # [T, H]
            if i + 1 in want and i + 1 < n:
                hidden[i + 1] = x[None]
        if n in want:
            hidden[n] = m.model.norm(x)[None]
        out = linear(x, m.lm_head.weight, norm=m.model.norm.weight, eps=eps)[None] if logits else None
        return out, {h: hidden[h % (n + 1)] for h in hidden_layers}

