"""Tile candidates for the Triton W4A8 kernel, read from the package's data files, and a heuristic.

The tile lists are data (``configs/default.json``, or ``configs/<gpu name>.json`` where a GPU has
its own), loaded with importlib.resources; this module turns them into the configurations worth
timing for one GEMM (tune.py times them) and, where timing is impossible (CPU interpreter,
inside CUDA-graph capture, tuning turned off), picks one without measuring.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Optional

import triton

from ...kernel_support import m_bucket
from ..cache import slug
from .launch import TileConfig

_PACKAGE = "quantvla_fx.kernels.triton"


@lru_cache(maxsize=None)
def tile_table(gpu_name: Optional[str] = None) -> dict:
    """The tile lists for this GPU model: its own file if the package ships one, else the default."""
    configs = resources.files(_PACKAGE).joinpath("configs")
    own = configs.joinpath(f"{slug(gpu_name)}.json") if gpu_name else None
    path = own if own is not None and own.is_file() else configs.joinpath("default.json")
    return json.loads(path.read_text())


def _max_block_kh(kh: int) -> int:
    # 32 packed bytes (64 k) is the smallest step: one int8 MMA needs K >= 32 per nibble half.
    return max(32, triton.next_power_of_2(kh))


def _smem_bytes(bn: int, bm: int, bkh: int, stages: int) -> int:
    # (stages - 1) buffers of the weight and activation tiles, plus the split activation halves.
    return (stages - 1) * (bn * bkh + 2 * bkh * bm) + 2 * bkh * bm


def _split_options(tiles: int, kh: int, block_kh: int, sm_count: int, wide: bool) -> list[int]:
    """Split-K counts worth trying: enough CTAs to fill the SMs a few times over, >= 1 K step each."""
    fits = [s for s in (1, 2, 4, 8, 16, 32) if s == 1 or (kh // s >= block_kh and tiles * s <= 4 * sm_count)]
    if wide:
        return fits
    # Grids from a quarter of the SMs to two waves: splitting has a cost (partial sums, the last
    # split's reduction), so under-filled grids sometimes win; measured, not guessed.
    near = [s for s in fits if sm_count <= 4 * tiles * s and tiles * s <= 2 * sm_count][:3]
    return near or [1]


def candidates(n: int, k: int, m_bucket: int, sm_count: int, wide: bool = False,
               gpu_name: Optional[str] = None) -> list[TileConfig]:
    """Configurations worth timing for this GEMM (``wide`` adds variants for offline sweeps).

    Few tokens (M bucket <= ``small_m``): weight streaming, one MMA N tile of tokens, tiles that
    fit in shared memory (``smem_limit_bytes``: Hopper's 227 KB less room for the epilogue's
    scratch).  Many tokens: MMA bound tiles.
    """
    table = tile_table(gpu_name)
    kh = k // 2
    small = m_bucket <= table["small_m"]
    lists = table["small" if small else "large"]
    tiles = lists["tiles"] + (lists["wide_extra"] if wide else [])
    out: list[TileConfig] = []
    for t in tiles:
        bn, bm = t["block_n"], max(16, m_bucket) if small else t["block_m"]
        bkh = min(t["block_kh"], _max_block_kh(kh))
        if small and _smem_bytes(bn, bm, bkh, t["num_stages"]) > table["smem_limit_bytes"]:
            continue
        grid = triton.cdiv(n, bn) * triton.cdiv(m_bucket, bm)
        for s in _split_options(grid, kh, bkh, sm_count, wide):
            out.append(TileConfig(bn, bm, bkh, s, t["num_warps"], t["num_stages"], t["interleave"]))
    return list(dict.fromkeys(out))  # small K clamps several tiles to the same one


def heuristic(n: int, k: int, m: int, sm_count: int = 132, gpu_name: Optional[str] = None) -> TileConfig:
    """A reasonable configuration without measuring: the candidate whose grid best fills the SMs."""
    b = m_bucket(m)
    cands = candidates(n, k, b, sm_count, gpu_name=gpu_name)

    def fill(c: TileConfig) -> float:
        ctas = triton.cdiv(n, c.block_n) * triton.cdiv(b, c.block_m) * c.split_k
        waves = ctas / sm_count
        return abs(waves - round(waves)) if waves >= 1 else 1 - waves

    return min(cands, key=fill) if cands else TileConfig(64, 16, 32)
