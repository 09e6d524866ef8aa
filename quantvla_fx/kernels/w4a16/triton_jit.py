"""The Triton W4A16 GEMM: bf16/fp16 activations × packed int4 weights, fp32 accumulation.

Computed "swapped", like the W4A8 kernel: the decoded weight tile [BLOCK_N, BLOCK_KH] is the MMA's
A operand (decoded in registers) and the token tile its B operand, so a handful of tokens still
fills a 64/128-row MMA with weight rows.  The two nibbles of a byte hold the even and odd k: x is
read as int32 (two 16-bit values), split into its even/odd halves, and acc += dot(w_lo, x_even) +
dot(w_hi, x_odd) — no reordering of K anywhere; or (INTERLEAVE) x is read in K order in its own
dtype and the two nibble halves are interleaved back into K order in registers (join + reshape)
for one dot.

Decode: ``(nibble | 0x4300)`` read as bf16 is exactly 128 + nibble (``0x6400``: 1024 + nibble in
fp16), so one OR and one subtraction give the signed value, exact.  Scales: per output channel,
applied once after the K loop; per group, each K step (BLOCK_KH divides the group) computes its
exact-product partial sum in fp32 and adds it times its group's scale.  Split-K (grid axis 1)
for skinny GEMMs: each split stores fp32 partial sums and the last split to arrive at a tile
(a per-tile counter, left at zero) reduces them and applies the epilogue.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode(w, X_FP16: tl.constexpr, FAST: tl.constexpr):
    """int8 bytes (offset-binary nibbles) -> (low, high) values nibble - 8 in the activation dtype.

    FAST: the magic-number decode (exact; an OR and a subtraction).  Otherwise (Triton's CPU
    interpreter, whose bf16 arithmetic and dots are wrong) fp32 values: the interpreter checks
    the indexing, masks, groups and split-K, the GPU tests check the bf16 path.
    """
    u = w.to(tl.int16) & 0xFF
    lo_u = (u & 0xF).to(tl.int16)  # (explicit int16: a literal may promote the expression to int32)
    hi_u = (u >> 4).to(tl.int16)
    if FAST:
        if X_FP16:
            lo = ((lo_u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0).to(tl.float16)
            hi = ((hi_u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0).to(tl.float16)
        else:
            lo = ((lo_u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0).to(tl.bfloat16)
            hi = ((hi_u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0).to(tl.bfloat16)
    else:
        lo = (lo_u - 8).to(tl.float32)
        hi = (hi_u - 8).to(tl.float32)
    return lo, hi


@triton.jit
def _halves(v, X_FP16: tl.constexpr, FAST: tl.constexpr):
    """int32 holding two 16-bit activations -> (even k, odd k) in the activation dtype (FAST) or fp32."""
    if X_FP16:
        a, b = v.to(tl.int16).to(tl.float16, bitcast=True), (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        a, b = v.to(tl.int16).to(tl.bfloat16, bitcast=True), (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    if not FAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return a, b


@triton.jit(do_not_specialize=["M"])  # M changes with every batch: keep it out of the compilation key
def w4a16_kernel(
    x_ptr,  # bf16/fp16 [M, K], unit stride along K, even row stride
    w_ptr,  # int8 [N, K/2] packed nibbles
    ws_ptr,  # fp32 [N, G] scales (G = 1 per channel), row stride stride_sn
    bias_ptr,  # [N] (any float dtype)
    out_ptr,  # [M, N] output dtype
    part_ptr,  # fp32 [split, M, N] partial sums (split-K only)
    cnt_ptr,  # int32 per-tile arrival counters, zero between launches (split-K only)
    M,
    N,
    KH,  # K / 2
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_KH: tl.constexpr,  # group size / 2, or 0 for one scale per output channel
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_FP16: tl.constexpr,
    FAST_DECODE: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # token tiles of one weight tile are neighbours: weights from HBM once
    pid_n = pid // num_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ld_n = offs_n % N  # out-of-range rows read valid memory and are never stored
    ld_m = offs_m % M
    offs_kh = tl.arange(0, BLOCK_KH)

    kh_per_split = tl.cdiv(tl.cdiv(KH, SPLIT_K), BLOCK_KH) * BLOCK_KH
    kh_lo = pid_k * kh_per_split
    kh_hi = tl.minimum(kh_lo + kh_per_split, KH)

    w_ptrs = w_ptr + ld_n[:, None] * stride_wn + (kh_lo + offs_kh)[None, :]
    if INTERLEAVE:
        offs_k = tl.arange(0, 2 * BLOCK_KH)
        x_ptrs = x_ptr + ld_m[None, :] * stride_xm + (2 * kh_lo + offs_k)[:, None]
    else:
        x32 = x_ptr.to(tl.pointer_type(tl.int32))
        x_ptrs = x32 + ld_m[None, :] * (stride_xm // 2) + (kh_lo + offs_kh)[:, None]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kh in range(kh_lo, kh_hi, BLOCK_KH):
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(kh + offs_kh)[None, :] < KH, other=0)
        lo, hi = _decode(w, X_FP16, FAST_DECODE)
        if INTERLEAVE:
            # x read in its own dtype, K in order (straight into shared memory for the dot); the
            # two nibble halves interleaved back into K order in registers.
            if EVEN_K:
                xt = tl.load(x_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=(2 * kh + offs_k)[:, None] < 2 * KH, other=0.0)
            if not FAST_DECODE:
                xt = xt.to(tl.float32)
            wk = tl.join(lo, hi).reshape(BLOCK_N, 2 * BLOCK_KH)
            if GROUP_KH > 0:
                p = tl.dot(wk, xt, out_dtype=tl.float32)
            else:
                acc = tl.dot(wk, xt, acc, out_dtype=tl.float32)
            x_ptrs += 2 * BLOCK_KH
        else:
            if EVEN_K:
                v = tl.load(x_ptrs)
            else:
                v = tl.load(x_ptrs, mask=(kh + offs_kh)[:, None] < KH, other=0)
            x_even, x_odd = _halves(v, X_FP16, FAST_DECODE)
            if GROUP_KH > 0:
                p = tl.dot(lo, x_even, out_dtype=tl.float32)
                p = tl.dot(hi, x_odd, p, out_dtype=tl.float32)
            else:
                acc = tl.dot(lo, x_even, acc, out_dtype=tl.float32)
                acc = tl.dot(hi, x_odd, acc, out_dtype=tl.float32)
            x_ptrs += BLOCK_KH
        if GROUP_KH > 0:
            s = tl.load(ws_ptr + ld_n * stride_sn + kh // GROUP_KH)
            acc += p * s[:, None]
        w_ptrs += BLOCK_KH
    acc = tl.trans(acc)  # token-major: stores run along N, contiguous

    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_off = offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K > 1:
        part_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + part_off, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            for s in tl.static_range(SPLIT_K):
                if s != pid_k:
                    acc += tl.load(part_ptr + s * M * N + part_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(cnt_ptr + pid, 0)  # counters live across launches: leave this one at zero
            _store(acc, out_ptr, out_off, out_mask, ws_ptr, bias_ptr, ld_n, stride_sn, GROUP_KH, HAS_BIAS)
    else:
        _store(acc, out_ptr, out_off, out_mask, ws_ptr, bias_ptr, ld_n, stride_sn, GROUP_KH, HAS_BIAS)


@triton.jit
def _store(acc, out_ptr, out_off, out_mask, ws_ptr, bias_ptr, ld_n, stride_sn, GROUP_KH: tl.constexpr,
           HAS_BIAS: tl.constexpr):
    """out = acc (· per-channel scale) (+ bias), in fp32, rounded once to the output dtype."""
    if GROUP_KH == 0:
        acc = acc * tl.load(ws_ptr + ld_n * stride_sn)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + ld_n).to(tl.float32)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
