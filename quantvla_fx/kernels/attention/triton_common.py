"""The inner loop both Triton attention kernels share: one tile of query rows against a key range.

Online softmax in fp32 (FlashAttention-2's rescaling); logits of keys a row may not see are
*replaced* by MASK_VALUE, exactly what SDPA gets from the finite additive mask: exp underflows to 0
next to any visible key, and a row with no visible key is uniform over all keys.  Columns past the
key range are -inf (they are not keys at all).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...attention_support import MASK_VALUE

_MASK = tl.constexpr(MASK_VALUE)


@triton.jit
def attend_range(q, row_sees, K, V, KVALID, b, kvh, start, end, scale,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_kvb,
                 D, HAS_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, m, l) of q (BLOCK_M, BLOCK_D) over keys [start, end): acc unnormalised, fp32.
    ``row_sees``: per row, whether its query may see keys at all (query_valid)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * scale
        allowed = row_sees[:, None]
        if HAS_KV:
            kv = tl.load(KVALID + b * stride_kvb + cols, mask=col_ok, other=0)
            allowed = allowed & (kv != 0)[None, :]
        s = tl.where(allowed, s, _MASK)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    return acc, m_i, l_i


def block_d(d: int) -> int:
    """Head dim padded to a power of two >= 16 (SigLIP's 72 -> 128); loads mask the padding."""
    return max(16, triton.next_power_of_2(d))


def as_bytes(valid):
    """A bool validity tensor as uint8 (same storage) for Triton loads, or a dummy when absent."""
    return valid.contiguous().view(torch.uint8) if valid is not None else None
