"""Flash-style attention for long queries (the 968-token prefix, SigLIP's 256 patches).

One program per (tile of BLOCK_M queries, batch x query head) walks all keys once; query head h
reads KV head h // (Hq/Hkv), so grouped K/V are never copied.  Head dims that are not a power of
two (SigLIP's 72) are padded in registers only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import as_bytes, attend_range, block_d


@triton.jit
def _flash_kernel(Q, K, V, KVALID, QVALID, OUT,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ob, stride_oh, stride_om, stride_od,
                  stride_kvb, stride_qvb,
                  scale, LQ, LK, HQ, G, D,
                  HAS_KV: tl.constexpr, HAS_QV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_in[:, None] & d_ok[None, :], other=0.0)
    row_sees = row_in | True
    if HAS_QV:
        qv = tl.load(QVALID + b * stride_qvb + rows, mask=row_in, other=0)
        row_sees = qv != 0
    acc, _, l_i = attend_range(q, row_sees, K, V, KVALID, b, kvh, 0, LK, scale,
                                 stride_kb, stride_kh, stride_kn, stride_kd,
                                 stride_vb, stride_vh, stride_vn, stride_vd, stride_kvb,
                                 D, HAS_KV, BLOCK_M, BLOCK_N, BLOCK_D)
    out = acc / l_i[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages); at head_dim 256, 8 warps halve the accumulator's
# registers per thread (a 64 x 256 fp32 tile in 4 warps spills).
DEFAULT_TILES = {"small_d": (64, 64, 4, 2), "large_d": (64, 32, 8, 2)}


def tiles(lq: int, d: int) -> dict:
    bd = block_d(d)
    m, n, w, s = DEFAULT_TILES["small_d" if bd <= 128 else "large_d"]
    return {"BLOCK_M": m if lq > 32 else 16, "BLOCK_N": n, "BLOCK_D": bd, "num_warps": w, "num_stages": s}


def attention(q, k, v, key_valid, query_valid, scale: float, **tile_overrides):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    t = {**tiles(lq, d), **tile_overrides}
    kvb, qvb = as_bytes(key_valid), as_bytes(query_valid)
    grid = (triton.cdiv(lq, t["BLOCK_M"]), b * hq)
    _flash_kernel[grid](
        q, k, v, kvb if kvb is not None else q, qvb if qvb is not None else q, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        kvb.stride(0) if kvb is not None else 0, qvb.stride(0) if qvb is not None else 0,
        scale, lq, lk, hq, hq // hkv, d,
        HAS_KV=kvb is not None, HAS_QV=qvb is not None, **t)
    return out
