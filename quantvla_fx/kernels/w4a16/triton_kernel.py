"""The ``triton`` W4A16 kernel object: a tile per GEMM (memory, tuning cache, timing, heuristic), launch.

Every tile is checked against the fp64 truth (verify.py) before it is timed, so a tile that
miscompiles can never be cached.  Winners live in ``<cache>/triton_w4a16/<gpu name>.json``,
stamped with the triton version.  This module imports without a GPU; without triton the kernel
is still handed out and says why it cannot run.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch

from ...kernel_support import m_bucket, w4a16_device_reason, w4a16_shape_reason
from .. import cache, timing
from . import verify

log = logging.getLogger("quantvla_fx")

try:
    import triton

    from .triton_launch import W4A16Tile, launch
    from .triton_tiles import candidates, heuristic

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:
    _IMPORT_ERROR = f"triton is not installed or unusable ({e})"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_DTYPES = (torch.bfloat16, torch.float16)


def _group_size(w_scale: torch.Tensor, k: int) -> int:
    return -1 if w_scale.dim() == 1 or w_scale.shape[1] == 1 else k // w_scale.shape[1]


def time_tiles(n, k, m, group_size, tiles, device) -> list[tuple["W4A16Tile", Optional[float], str]]:
    """(tile, median µs or None, note) for each tile; wrong or failing ones get None."""
    x, w, s = verify.random_problem(m, n, k, group_size, torch.bfloat16, device)
    want = verify.truth(x, w, s)
    out = []
    for cfg in tiles:
        run = lambda x=x, w=w, s=s, cfg=cfg: launch(x, w, s, None, torch.bfloat16, cfg)  # noqa: E731
        try:
            why = verify.linear_error(lambda *a, cfg=cfg: launch(*a, cfg), x, w, s, None, torch.bfloat16, want)
            if why:
                log.warning("triton W4A16 tile %s is WRONG for N=%d K=%d M=%d (%s); skipped", cfg.key(), n, k, m, why)
                out.append((cfg, None, f"wrong: {why}"))
                continue
            out.append((cfg, timing.median_us(run, device), "ok"))
        except Exception as e:  # e.g. out of shared memory for this tile on this GPU
            out.append((cfg, None, f"failed: {type(e).__name__}: {str(e)[:200]}"))
    return out


class TritonW4A16Kernel:
    name = "triton"

    def __init__(self) -> None:
        self._tiles: dict[tuple, "W4A16Tile"] = {}
        self._stores: dict[str, cache.JsonStore] = {}
        self._lock = threading.Lock()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return _IMPORT_ERROR or w4a16_device_reason(self.name, torch.device(device))

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        return w4a16_shape_reason(self.name, n, k, group_size)

    def _store(self, device: torch.device) -> cache.JsonStore:
        gpu = torch.cuda.get_device_name(device)
        if gpu not in self._stores:
            path = cache.cache_root() / "triton_w4a16" / f"{cache.slug(gpu)}.json"
            self._stores[gpu] = cache.JsonStore(path, {"gpu": gpu, "triton": triton.__version__})
        return self._stores[gpu]

    def tile_for(self, n: int, k: int, m: int, group_size: int, device: torch.device) -> "W4A16Tile":
        """Remembered, cached on disk, tuned now (QUANTVLA_TRITON_AUTOTUNE != 0), or the heuristic."""
        if INTERPRET or device.type != "cuda":
            return heuristic(n, k, m, group_size)
        b = m_bucket(m)
        key = (device.index, n, k, b, group_size)
        cfg = self._tiles.get(key)
        if cfg is not None:
            return cfg
        with self._lock:
            if key in self._tiles:
                return self._tiles[key]
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            store = self._store(device)
            skey = f"N{n}_K{k}_M{b}_g{group_size}"
            entry = store.get(skey)
            cfg = W4A16Tile.from_dict(entry["config"]) if entry else None
            if cfg is None and not torch.cuda.is_current_stream_capturing() \
                    and os.environ.get("QUANTVLA_TRITON_AUTOTUNE", "1") != "0":
                timed = [(c, us) for c, us, _ in time_tiles(n, k, b, group_size, candidates(n, k, b, group_size, sms),
                                                            device) if us is not None]
                if timed:
                    cfg, us = min(timed, key=lambda t: t[1])
                    store.put(skey, {"config": cfg.to_dict(), "us": round(us, 3)})
                    log.info("triton W4A16: N=%d K=%d M<=%d group %d -> %s (%.1f us)", n, k, b, group_size, cfg.key(), us)
            if cfg is None:
                cfg = heuristic(n, k, m, group_size, sms)
            self._tiles[key] = cfg
            return cfg

    def linear(self, x, w_packed, w_scale, bias, out_dtype) -> torch.Tensor:
        n, k = w_packed.shape[0], x.shape[1]
        if x.dtype not in ACT_DTYPES:
            raise ValueError(f"the triton W4A16 kernel takes bfloat16 or float16 activations, got {x.dtype}")
        group_size = _group_size(w_scale, k)
        why = self.unsupported_reason(n, k, group_size, x.device)
        if why:
            raise ValueError(why)
        return launch(x, w_packed.view(torch.int8), w_scale, bias, out_dtype, self.tile_for(n, k, x.shape[0], group_size, x.device))


KERNEL = TritonW4A16Kernel()


def kernel_for(settings) -> TritonW4A16Kernel:
    return KERNEL
