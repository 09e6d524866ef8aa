"""The Triton W4A8 GEMM kernel (int8 activations × packed int4 weights -> int32 or scaled output).

Always computed "swapped": the weight tile [BLOCK_N, BLOCK_K] is the MMA's A operand (it is
decoded in registers, and Hopper's wgmma takes A from registers) and the token tile is the B
operand, so a handful of tokens still fills a 64/128-row MMA with weight rows.  Split-K
(``SPLIT``; the split count is grid axis 1) lets tall-K / narrow-N GEMMs fill every SM: partial int32 sums are
atomically added into a zeroed int32 buffer, and for the scaled output the last split to finish
a tile (counted by a per-tile atomic counter) applies the epilogue.

Two ways of matching the two nibbles of a byte with their activations (``INTERLEAVE``):
  * False: x is read as int16 (two consecutive int8 values per element); its low/high bytes are
    the even/odd-k activations, so acc += dot(w_lo, x_even) + dot(w_hi, x_odd) and nothing needs
    reordering.
  * True: the two nibbles are interleaved back into K order in registers (join + reshape) and one
    dot runs against x read as int8.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_nibbles(w, FAST_UNPACK: tl.constexpr):
    """int8 bytes (offset-binary nibbles) -> (low, high) int8 values in [-8, 7]."""
    if FAST_UNPACK:
        # Four bytes per 32-bit register: (nibble + 0x78) ^ 0x80 == nibble - 8, with no carry
        # between bytes, so both halves cost a few 32-bit ops per four weights.
        lo, hi = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t;
            and.b32 t, $2, 0x0F0F0F0F;
            add.u32 t, t, 0x78787878;
            xor.b32 $0, t, 0x80808080;
            shr.u32 t, $2, 4;
            and.b32 t, t, 0x0F0F0F0F;
            add.u32 t, t, 0x78787878;
            xor.b32 $1, t, 0x80808080;
            }
            """,
            constraints="=r,=r,r",
            args=[w],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:
        lo = (w & 0xF) - 8
        hi = ((w >> 4) & 0xF) - 8
    return lo, hi


# M changes with every batch: keep it out of the compilation key.
@triton.jit(do_not_specialize=["M"])
def w4a8_kernel(
    x_ptr,  # int8 [M, K] (row stride stride_xm, unit stride along K)
    w_ptr,  # int8 [N, K/2] packed nibbles
    out_ptr,  # [M, N]: int32 (mm) or the output dtype (scaled)
    ws_ptr,  # int32 [M, N] zeroed split-K accumulator (scaled split-K only)
    cnt_ptr,  # int32 per-tile arrival counters, zeroed (scaled split-K only)
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
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    FAST_UNPACK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    split_k = tl.num_programs(1)
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

    kh_per_split = tl.cdiv(tl.cdiv(KH, split_k), BLOCK_KH) * BLOCK_KH
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
        lo, hi = _unpack_nibbles(w, FAST_UNPACK)
        if INTERLEAVE:
            if EVEN_K:
                xt = tl.load(x_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=(2 * kh + offs_k)[:, None] < 2 * KH, other=0)
            wk = tl.join(lo, hi).reshape(BLOCK_N, 2 * BLOCK_KH)
            acc = tl.dot(wk, xt, acc)
            x_ptrs += 2 * BLOCK_KH
        else:
            if EVEN_K:
                v = tl.load(x_ptrs)
            else:
                v = tl.load(x_ptrs, mask=(kh + offs_kh)[:, None] < KH, other=0)
            x_even = v.to(tl.int8)  # low byte = x[2j] (little-endian)
            x_odd = (v >> 8).to(tl.int8)
            acc = tl.dot(lo, x_even, acc)
            acc = tl.dot(hi, x_odd, acc)
            x_ptrs += BLOCK_KH
        w_ptrs += BLOCK_KH

    out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    out_off = offs_m[None, :] * stride_om + offs_n[:, None]
    if not SPLIT:
        if SCALED:
            _store_scaled(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, HAS_BIAS)
        else:
            tl.store(out_ptr + out_off, acc, mask=out_mask)
    elif SCALED:
        tl.atomic_add(ws_ptr + out_off, acc, mask=out_mask, sem="relaxed")
        # Every thread's partial sum is issued before one thread announces the tile's arrival
        # (release); the last arriving split reads the complete sums from L2 (acquire, .cg).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total = tl.load(ws_ptr + out_off, mask=out_mask, other=0, cache_modifier=".cg")
            _store_scaled(total, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, HAS_BIAS)
    else:
        tl.atomic_add(out_ptr + out_off, acc, mask=out_mask, sem="relaxed")


@triton.jit
def _store_scaled(acc, out_ptr, out_off, out_mask, xs_ptr, wsc_ptr, bias_ptr, ld_m, ld_n, HAS_BIAS: tl.constexpr):
    """out = acc * x_scale[m] * w_scale[n] (+ bias[n]), in fp32, in the reference's order."""
    xs = tl.load(xs_ptr + ld_m)
    wsc = tl.load(wsc_ptr + ld_n)
    y = acc.to(tl.float32) * xs[None, :] * wsc[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + ld_n).to(tl.float32)[:, None]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=out_mask)
