"""Tile candidates for the Triton W4A16 kernel and a heuristic for when timing is impossible.

Few tokens (M bucket <= 64, the skinny path): the GEMM streams the weights, so tiles are one
MMA column of tokens wide (BLOCK_M = max(16, bucket)) and split-K fills the SMs (LM down_proj at
M = 10: K = 16384, N = 2048).  Many tokens: MMA-bound tiles, as for a bf16 GEMM.
"""
from __future__ import annotations

import triton

from .triton_launch import W4A16Tile

SMALL_M = 64
# (block_n, block_kh, num_warps, num_stages); BLOCK_M is the bucket.  Chosen from an sm_90
# ahead-of-time compile sweep (registers without spills: 8 warps for 8 KB weight steps; 4 warps
# spill there); the GPU tuner picks among them.
# (block_n, block_kh, num_warps, num_stages, interleave)
SMALL = [(64, 64, 8, 4, False), (128, 64, 8, 4, False), (128, 32, 8, 4, False), (64, 128, 8, 3, False),
         (64, 64, 4, 4, False), (128, 64, 8, 3, False), (64, 64, 8, 4, True), (128, 64, 8, 4, True)]
# (block_n, block_m, block_kh, num_warps, num_stages, interleave); 8 warps: 4 spill at 128 x 128
LARGE = [(128, 128, 32, 8, 3, False), (128, 128, 32, 8, 4, False), (128, 64, 32, 8, 3, False),
         (128, 64, 64, 8, 3, False), (64, 128, 32, 4, 3, False), (128, 128, 32, 8, 3, True)]


def _splits(tiles: int, kh: int, block_kh: int, sm_count: int) -> list[int]:
    """Split-K counts giving from a quarter of the SMs to two waves, each split >= 2 K steps."""
    fits = [s for s in (1, 2, 4, 8, 16, 32) if s == 1 or kh // s >= 2 * block_kh]
    near = [s for s in fits if sm_count <= 4 * tiles * s and tiles * s <= 2 * sm_count]
    return near[:3] or [max(fits)] if tiles < sm_count else [1]


def _spills(bn: int, bm: int, bkh: int, warps: int, interleave: bool, grouped: bool, small: bool) -> bool:
    """Tiles that spill registers on sm_90 (ahead-of-time compile sweep of every candidate, Triton 3.9)."""
    if small:
        return bm >= 32 and (bkh >= 128 or (warps == 4 and bm >= 64) or (interleave and bn >= 128))
    return grouped and (interleave or (warps == 4 and bn * bm >= 8192))


def candidates(n: int, k: int, m_bucket: int, group_size: int, sm_count: int = 132) -> list[W4A16Tile]:
    from .triton_launch import fit_block_kh

    kh = k // 2
    out = []
    if m_bucket <= SMALL_M:
        bm = max(16, m_bucket)
        for bn, bkh, warps, stages, il in SMALL:
            bkh = fit_block_kh(bkh, kh, group_size)
            if _spills(bn, bm, bkh, warps, il, group_size > 0, True):
                continue
            tiles = triton.cdiv(n, bn)
            for s in _splits(tiles, kh, bkh, sm_count):
                out.append(W4A16Tile(bn, bm, bkh, s, warps, stages, il))
    else:
        for bn, bm, bkh, warps, stages, il in LARGE:
            if not _spills(bn, bm, bkh, warps, il, group_size > 0, False):
                out.append(W4A16Tile(bn, bm, fit_block_kh(bkh, kh, group_size), 1, warps, stages, il))
    return list(dict.fromkeys(out))


def heuristic(n: int, k: int, m: int, group_size: int, sm_count: int = 132) -> W4A16Tile:
    """The candidate whose grid best fills the SMs (no measurement)."""
    from ...kernel_support import m_bucket

    b = m_bucket(m)
    cands = candidates(n, k, b, group_size, sm_count)

    def fill(c: W4A16Tile) -> float:
        waves = triton.cdiv(n, c.block_n) * triton.cdiv(b, c.block_m) * c.split_k / sm_count
        return abs(waves - round(waves)) if waves >= 1 else 1 - waves

    return min(cands, key=fill)
