"""Tile configurations for the Triton W4A8 kernel: candidates, a heuristic pick, and a disk cache.

The best configuration is chosen per (op, N, K, M-bucket) by timing a few candidates once on the GPU
(see triton_w4a8_tune.py) and stored in ``<cache>/triton/<gpu name>.json``, where ``<cache>`` is
``$QUANTVLA_CACHE_DIR`` or ``~/.cache/quantvla_fx``.  Where timing is impossible (CPU interpreter,
inside CUDA-graph capture, tuning turned off) the heuristic below picks one without measuring.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Optional

import triton

from .triton_w4a8_launch import TileConfig

log = logging.getLogger("quantvla_fx")

# Token counts up to this use the weight-streaming (small-M) tiles.
SMALL_M = 64


def cache_path(gpu_name: str) -> Path:
    root = os.environ.get("QUANTVLA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "quantvla_fx")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu_name).strip("_") or "gpu"
    return Path(root) / "triton" / f"{safe}.json"


def _max_block_kh(kh: int) -> int:
    # 32 packed bytes (64 k) is the smallest step: one int8 MMA needs K >= 32 per nibble half.
    return max(32, triton.next_power_of_2(kh))


def _smem_bytes(bn: int, bm: int, bkh: int, stages: int) -> int:
    # (stages - 1) buffers of the weight and activation tiles, plus the split activation halves.
    return (stages - 1) * (bn * bkh + 2 * bkh * bm) + 2 * bkh * bm


# Hopper allows 227 KB of shared memory per block; leave room for the epilogue's scratch.
SMEM_LIMIT = 220 * 1024


def _split_options(tiles: int, kh: int, block_kh: int, sm_count: int, wide: bool) -> list[int]:
    """Split-K counts worth trying: enough CTAs to fill the SMs a few times over, >= 1 K step each."""
    fits = [s for s in (1, 2, 4, 8, 16, 32) if s == 1 or (kh // s >= block_kh and tiles * s <= 4 * sm_count)]
    if wide:
        return fits
    # Grids from a quarter of the SMs to two waves: splitting has a cost (partial sums, the last
    # split's reduction), so under-filled grids sometimes win; measured, not guessed.
    near = [s for s in fits if sm_count <= 4 * tiles * s and tiles * s <= 2 * sm_count][:3]
    return near or [1]


# (BLOCK_N, BLOCK_KH, num_warps, num_stages, interleave) for few tokens: weight streaming, one
# MMA N tile of tokens.  The lists hold the configurations that won an H200 sweep
# (benchmarks/triton_w4a8_check.py); the wide lists add the runners-up for future sweeps.
_SMALL_TILES = [(64, 128, 4, 4, False), (64, 256, 4, 3, False), (128, 128, 8, 4, False), (128, 256, 8, 3, False), (64, 128, 4, 4, True)]
_SMALL_TILES_WIDE = _SMALL_TILES + [(128, 128, 4, 4, False), (64, 256, 4, 4, False), (128, 128, 4, 5, False)]
# (BLOCK_N, BLOCK_M, BLOCK_KH, num_warps, num_stages, interleave) for many tokens: MMA bound.
_LARGE_TILES = [(128, 128, 64, 4, 4, False), (128, 64, 128, 4, 3, False), (128, 128, 64, 8, 4, False), (128, 64, 64, 4, 4, False), (256, 128, 64, 8, 3, False)]
_LARGE_TILES_WIDE = _LARGE_TILES + [(128, 128, 128, 8, 3, False), (128, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, False)]


def candidates(n: int, k: int, m_bucket: int, sm_count: int, wide: bool = False) -> list[TileConfig]:
    """Configurations worth timing for this GEMM (``wide`` adds variants for offline sweeps)."""
    kh = k // 2
    out: list[TileConfig] = []
    if m_bucket <= SMALL_M:
        bm = max(16, m_bucket)
        for bn, bkh, nw, st, il in _SMALL_TILES_WIDE if wide else _SMALL_TILES:
            bkh = min(bkh, _max_block_kh(kh))
            if _smem_bytes(bn, bm, bkh, st) > SMEM_LIMIT:
                continue
            t = triton.cdiv(n, bn) * triton.cdiv(m_bucket, bm)
            for s in _split_options(t, kh, bkh, sm_count, wide):
                out.append(TileConfig(bn, bm, bkh, s, nw, st, il))
    else:
        for bn, bm, bkh, nw, st, il in _LARGE_TILES_WIDE if wide else _LARGE_TILES:
            bkh = min(bkh, _max_block_kh(kh))
            t = triton.cdiv(n, bn) * triton.cdiv(m_bucket, bm)
            for s in _split_options(t, kh, bkh, sm_count, wide):
                out.append(TileConfig(bn, bm, bkh, s, nw, st, il))
    return list(dict.fromkeys(out))  # small K clamps several tiles to the same one


def heuristic(n: int, k: int, m: int, sm_count: int = 132) -> TileConfig:
    """A reasonable configuration without measuring (first candidate of the narrow list)."""
    from .registry import m_bucket

    b = m_bucket(m)
    cands = candidates(n, k, b, sm_count)
    # Prefer the candidate whose grid best fills the SMs.
    def fill(c: TileConfig) -> float:
        ctas = triton.cdiv(n, c.block_n) * triton.cdiv(b, c.block_m) * c.split_k
        waves = ctas / sm_count
        return abs(waves - round(waves)) if waves >= 1 else 1 - waves

    return min(cands, key=fill) if cands else TileConfig(64, 16, 32)


class ConfigCache:
    """Tuned configurations for one GPU, persisted as JSON; safe to share between threads."""

    def __init__(self, gpu_name: str):
        self.path = cache_path(gpu_name)
        self.gpu_name = gpu_name
        self._lock = threading.Lock()
        self._entries: Optional[dict] = None

    @staticmethod
    def key(n: int, k: int, m_bucket: int, scaled: bool) -> str:
        return f"{'linear' if scaled else 'mm'}_N{n}_K{k}_M{m_bucket}"

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = {}
            try:
                data = json.loads(self.path.read_text())
                if data.get("triton") == triton.__version__:
                    self._entries = data.get("configs", {})
                else:
                    log.info("triton W4A8 config cache %s is from triton %s; re-tuning", self.path, data.get("triton"))
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable triton W4A8 config cache %s: %s", self.path, e)
        return self._entries

    def get(self, n: int, k: int, m_bucket: int, scaled: bool = False) -> Optional[TileConfig]:
        with self._lock:
            d = self._load().get(self.key(n, k, m_bucket, scaled))
        return TileConfig.from_dict(d["config"]) if d else None

    def put(self, n: int, k: int, m_bucket: int, cfg: TileConfig, us: float, scaled: bool = False) -> None:
        with self._lock:
            entries = self._load()
            entries[self.key(n, k, m_bucket, scaled)] = {"config": cfg.to_dict(), "us": round(us, 3)}
            payload = {"gpu": self.gpu_name, "triton": triton.__version__, "configs": entries}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(payload, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)  # atomic: concurrent processes never read half a file
            except OSError as e:
                log.warning("could not write triton W4A8 config cache %s: %s", self.path, e)
