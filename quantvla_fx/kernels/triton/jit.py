"""The Triton W4A8 GEMM kernel (int8 activations × packed int4 weights -> int32 or scaled output).

Always computed "swapped": the weight tile [BLOCK_N, BLOCK_K] is the MMA's A operand (it is
decoded in registers, and Hopper's wgmma takes A from registers) and the token tile is the B
operand, so a handful of tokens still fills a 64/128-row MMA with weight rows.  Split-K
(``SPLIT_K`` > 1, grid axis 1) lets tall-K / narrow-N GEMMs fill every SM: each split
stores its int32 partial sums, and the last split to finish a tile (a per-tile atomic counter,
reset to zero by that split) reduces them and applies the epilogue.

Two ways of matching the two nibbles of a byte with their activations (``INTERLEAVE``):
  * False: x is read as int16 (two consecutive int8 values per element); its low/high bytes are
    the even/odd-k activations, so acc += dot(w_lo, x_even) + dot(w_hi, x_odd) and nothing needs
    reordering.
  * True: the two nibbles are interleaved back into K order in registers (join + reshape) and one
    dot runs against x read as int8.

Known limit (Triton 3.6, H200): Triton issues an int8 wgmma synchronously (its pipeliner makes
a dot async only with an fp32 accumulator), so MMA never overlaps the next tile's decode within
a CTA; at M ~ 1000 the kernel only matches cuBLAS bf16.  Async wgmma needs Gluon or CUDA.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_nibbles_x16(w, FAST_UNPACK: tl.constexpr):
    """int8 bytes (offset-binary nibbles) -> (low, high) int8 values 16·(nibble - 8).

    Keeping each nibble in the top half of its byte needs no carry-free subtraction:
    ((u << 4) ^ 0x80) as int8 is exactly 16·(u - 8), so both halves cost three 32-bit ops per
    four bytes; the accumulator is divided by 16 (an exact shift) after the K loop.
    """
    if FAST_UNPACK:
        lo, hi = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t;
            shl.b32 t, $2, 4;
            lop3.b32 $0, t, 0xF0F0F0F0, 0x80808080, 0x6a;
            lop3.b32 $1, $2, 0xF0F0F0F0, 0x80808080, 0x6a;
            }
            """,
            constraints="=r,=r,r",
            args=[w],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:
        lo = ((w << 4) & -16) ^ -128
        hi = (w & -16) ^ -128
    return lo, hi


# M changes with every batch: keep it out of the compilation key.
@triton.jit(do_not_specialize=["M"])
def w4a8_kernel(
    x_ptr,  # int8 [M, K] (row stride stride_xm, unit stride along K)
    w_ptr,  # int8 [N, K/2] packed nibbles
    out_ptr,  # [M, N]: int32 (mm) or the output dtype (scaled)
    part_ptr,  # int32 [split, M, N] partial sums (split-K only)
    cnt_ptr,  # int32 per-tile arrival counters, zero between launches (split-K only)
    xs_ptr,  # fp32 [M] per-token scales
    wsc_ptr,  # fp32 [N] per-channel scales
    bias_ptr,  # [N] bias (any float dtype)
    M,
    N,
    KH,  # K / 2: packed bytes per weight row
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    FAST_UNPACK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    # Token tiles of one weight tile are neighbours in launch order: the weights come from HBM
    # once and the other token tiles re-read them from L2.
    pid_m = pid % num_m
    pid_n = pid // num_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows read valid memory (wrapped) and are never stored: no load masks needed.
    ld_n = offs_n % N
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
        x16 = x_ptr.to(tl.pointer_type(tl.int16))
        x_ptrs = x16 + ld_m[None, :] * (stride_xm // 2) + (kh_lo + offs_kh)[:, None]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for kh in range(kh_lo, kh_hi, BLOCK_KH):
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(kh + offs_kh)[None, :] < KH, other=0)
        lo, hi = _unpack_nibbles_x16(w, FAST_UNPACK)
        if INTERLEAVE:
            if EVEN_K:
                xt = tl.load(x_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=(2 * kh + offs_k)[:, None] < 2 * KH, other=0)
            wk = tl.join(lo, hi).reshape(BLOCK_N, 2 * BLOCK_KH)
            acc = tl.dot(wk, xt, acc, out_dtype=tl.int32)
            x_ptrs += 2 * BLOCK_KH
        else:
            if EVEN_K:
                v = tl.load(x_ptrs)
            else:
                v = tl.load(x_ptrs, mask=(kh + offs_kh)[:, None] < KH, other=0)
            x_even = v.to(tl.int8)  # low byte = x[2j] (little-endian)
            x_odd = (v >> 8).to(tl.int8)
            acc = tl.dot(lo, x_even, acc, out_dtype=tl.int32)
            acc = tl.dot(hi, x_odd, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_KH
        w_ptrs += BLOCK_KH
    # The weights were scaled by 16 in _unpack_nibbles_x16 (exact shift).  Token-major from here
    # on, so that stores run along N, contiguous in memory, in wide vectors.
    acc = tl.trans(acc >> 4)

    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_off = offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K > 1:
        # Each split stores its partial sums (no zero-filled buffer, no extra launch); the last
        # split to arrive at this tile adds them up.  All threads' stores are issued before one
        # thread announces the arrival (bar.sync, then an acq_rel atomic at GPU scope); the last
        # one reads the other partials from L2 (.cg) after its acquire.
        part_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + part_off, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            for s in tl.static_range(SPLIT_K):  # unrolled: all partial loads in flight at once
                if s != pid_k:
                    acc += tl.load(part_ptr + s * M * N + part_off, mask=out_mask, other=0, cache_modifier=".cg")
            # Counters live across launches: leave this one at zero for the next launch.
            tl.store(cnt_ptr + pid, 0)
            _store_out(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, SCALED, HAS_BIAS)
    else:
        _store_out(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, SCALED, HAS_BIAS)


@triton.jit
def _store_out(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
    if SCALED:
        _store_scaled(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, HAS_BIAS)
    else:
        tl.store(out_ptr + out_off, acc, mask=out_mask)


@triton.jit
def _store_scaled(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, HAS_BIAS: tl.constexpr):
    """out = acc * x_scale[m] * w_scale[n] (+ bias[n]), in fp32, in the reference's order."""
    xs = tl.load(xs_ptr + ld_m)
    wsc = tl.load(wsc_ptr + ld_n)
    y = acc.to(tl.float32) * xs[:, None] * wsc[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + ld_n).to(tl.float32)[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=out_mask)
