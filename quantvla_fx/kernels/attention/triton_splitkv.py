"""Split-KV attention for few queries (the action expert: 8 query heads x 10 queries, 1 KV head).

The query heads sharing a KV head are packed into one tile of rows (row r = g*Lq + i is query i
of head kvh*G + g), so K/V are read once per KV head, and the keys are split over enough programs
to fill the GPU; a second small kernel merges the splits (log-sum-exp rescaling).  With one split
the first kernel normalises and writes the output itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import as_bytes, attend_range, block_d


@triton.jit
def _attention_splitkv_kernel(Q, K, V, KVALID, QVALID, OUT, OPART, MPART, LPART,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ob, stride_oh, stride_om, stride_od,
                  stride_kvb, stride_qvb,
                  scale, LQ, LK, G, HKV, SPLIT_LEN, NUM_SPLITS, D,
                  HAS_KV: tl.constexpr, HAS_QV: tl.constexpr, ONE_SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = G * LQ
    row_in = rows < n_rows
    g = rows // LQ
    i = rows % LQ
    head = kvh * G + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_in[:, None] & d_ok[None, :], other=0.0)
    row_sees = row_in | True
    if HAS_QV:
        qv = tl.load(QVALID + b * stride_qvb + i, mask=row_in, other=0)
        row_sees = qv != 0
    start = pid_s * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, LK)
    acc, m_i, l_i = attend_range(q, row_sees, K, V, KVALID, b, kvh, start, end, scale,
                                 stride_kb, stride_kh, stride_kn, stride_kd,
                                 stride_vb, stride_vh, stride_vn, stride_vd, stride_kvb,
                                 D, HAS_KV, BLOCK_M, BLOCK_N, BLOCK_D)
    if ONE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + i[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
    else:
        part = (pid_bh * NUM_SPLITS + pid_s) * n_rows + rows
        tl.store(OPART + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_in[:, None])
        tl.store(MPART + part, m_i, mask=row_in)
        tl.store(LPART + part, l_i, mask=row_in)


@triton.jit
def _attention_merge_kernel(OUT, OPART, MPART, LPART, stride_ob, stride_oh, stride_om, stride_od,
                  LQ, G, HKV, NUM_SPLITS, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    n_rows = G * LQ
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    m_g = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m_s = tl.load(MPART + (pid_bh * NUM_SPLITS + s) * n_rows + rows, mask=row_in, other=0.0)
        m_g = tl.maximum(m_g, m_s)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_g = tl.zeros((BLOCK_M,), tl.float32)
    for s in range(NUM_SPLITS):
        part = (pid_bh * NUM_SPLITS + s) * n_rows + rows
        w = tl.exp(tl.load(MPART + part, mask=row_in, other=0.0) - m_g)
        l_g += w * tl.load(LPART + part, mask=row_in, other=0.0)
        acc += w[:, None] * tl.load(OPART + part[:, None] * BLOCK_D + offs_d[None, :], mask=row_in[:, None], other=0.0)
    out = acc / l_g[:, None]
    g = rows // LQ
    i = rows % LQ
    head = kvh * G + g
    tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + i[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=row_in[:, None] & (offs_d < D)[None, :])


# Tiles (BLOCK_M, BLOCK_N, num_warps) per head-dim class and packed query rows (query heads of a
# KV head x queries): at head_dim 256 the winners of an H200 sweep (bench_attention.py --sweep:
# 80 rows 22.5 µs, 400 rows 20.0 µs, 7744 rows 39.8 µs); up to 128 the first choice, unswept.
DEFAULT_TILES = {"small_d": ((None, (32, 64, 4)),),
                 "large_d": ((128, (32, 64, 4)), (512, (16, 64, 8)), (None, (64, 32, 4)))}


def default_tile(bd: int, rows: int) -> tuple[int, int, int]:
    for most_rows, tile in DEFAULT_TILES["small_d" if bd <= 128 else "large_d"]:
        if most_rows is None or rows <= most_rows:
            return tile
    raise AssertionError("the last tile of each class takes any number of rows")


def plan(b: int, hkv: int, rows: int, lk: int, d: int, sm_count: int, block_m=None, block_n=None,
         num_warps=None, splits=None, programs_per_sm: int = 2) -> dict:
    """Tile sizes and the number of key splits: enough programs to cover the SMs ``programs_per_sm`` times."""
    bd = block_d(d)
    dm, dn, dw = default_tile(bd, rows)
    block_m = block_m or min(dm, max(16, triton.next_power_of_2(rows)))
    block_n = block_n or dn
    row_blocks = triton.cdiv(rows, block_m)
    chunks = triton.cdiv(lk, block_n)
    if splits is None:
        splits = max(1, (programs_per_sm * sm_count) // max(1, b * hkv * row_blocks))
    splits = max(1, min(splits, chunks))
    split_len = triton.cdiv(chunks, splits) * block_n
    splits = triton.cdiv(lk, split_len)  # every split holds at least one key
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": bd, "num_warps": num_warps or dw,
            "row_blocks": row_blocks, "splits": splits, "split_len": split_len}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention(q, k, v, key_valid, query_valid, scale: float, **tiles):
    """``tiles``: plan() overrides (block_m, block_n, num_warps, splits) for tests and the benchmark sweep."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    p = plan(b, hkv, g * lq, lk, d, _sm_count(q.device), **tiles)
    n = p["splits"]
    one = n == 1
    shape = (1,) if one else (b * hkv * n * g * lq,)
    opart = torch.empty(shape + ((p["BLOCK_D"],) if not one else ()), dtype=torch.float32, device=q.device)
    mpart = torch.empty(shape, dtype=torch.float32, device=q.device)
    lpart = torch.empty(shape, dtype=torch.float32, device=q.device)
    kvb, qvb = as_bytes(key_valid), as_bytes(query_valid)
    grid = (b * hkv, p["row_blocks"], n)
    _attention_splitkv_kernel[grid](
        q, k, v, kvb if kvb is not None else q, qvb if qvb is not None else q, out, opart, mpart, lpart,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        kvb.stride(0) if kvb is not None else 0, qvb.stride(0) if qvb is not None else 0,
        scale, lq, lk, g, hkv, p["split_len"], n, d,
        HAS_KV=kvb is not None, HAS_QV=qvb is not None, ONE_SPLIT=one,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_D=p["BLOCK_D"], num_warps=p["num_warps"], num_stages=2)
    if not one:
        _attention_merge_kernel[(b * hkv, p["row_blocks"])](
            out, opart, mpart, lpart, *out.stride(), lq, g, hkv, n, d,
            BLOCK_M=p["BLOCK_M"], BLOCK_D=p["BLOCK_D"], num_warps=4)
    return out
