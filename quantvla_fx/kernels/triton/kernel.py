"""The ``triton`` kernel object: picks a tile configuration per GEMM and launches the kernel.

The configuration comes from this process's memory, the per-GPU tuning cache (tune.py), a
measurement now, or the heuristic (tiles.py).  This module imports without a GPU; without a
usable triton the kernel is still handed out and says why it cannot run.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch

from ...kernel_support import device_reason, m_bucket, shape_reason

log = logging.getLogger("quantvla_fx")

try:
    import triton  # noqa: F401

    from .launch import INTERPRET, TileConfig, launch
    from .tiles import candidates, heuristic
    from .tune import ConfigCache, best_config

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # triton missing (or too old to provide the APIs used)
    _IMPORT_ERROR = f"triton is not installed or unusable ({e})"


def _autotune_enabled() -> bool:
    return os.environ.get("QUANTVLA_TRITON_AUTOTUNE", "1") != "0"


class TritonW4A8Kernel:
    name = "triton"

    def __init__(self) -> None:
        self._configs: dict[tuple, "TileConfig"] = {}
        self._caches: dict[int, "ConfigCache"] = {}
        self._lock = threading.Lock()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return _IMPORT_ERROR or device_reason(self.name, device)

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        return shape_reason(self.name, n, k, group_size)

    # -- configuration choice ------------------------------------------------------------------

    def _cache_for(self, device: torch.device) -> "ConfigCache":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._caches:
            self._caches[idx] = ConfigCache(torch.cuda.get_device_name(idx))
        return self._caches[idx]

    def config_for(self, n: int, k: int, m: int, device: torch.device, scaled: bool = False) -> "TileConfig":
        """The tile configuration for this GEMM (``scaled``: the fused-epilogue kernel): cached,
        tuned now, or the heuristic."""
        b = m_bucket(m)
        if INTERPRET or device.type != "cuda":
            return heuristic(n, k, m)
        key = (device.index, n, k, b, scaled)
        cfg = self._configs.get(key)
        if cfg is not None:
            return cfg
        with self._lock:
            cfg = self._configs.get(key)
            if cfg is not None:
                return cfg
            cache = self._cache_for(device)
            gpu = cache.gpu_name
            cfg = cache.get(n, k, b, scaled)
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            if cfg is None and torch.cuda.is_current_stream_capturing():
                # Timing is impossible inside graph capture: use the heuristic, cache nothing.
                log.warning("triton W4A8: no tuned config for N=%d K=%d M<=%d during CUDA-graph capture; using a heuristic one", n, k, b)
                return heuristic(n, k, m, sms, gpu)
            if cfg is None and _autotune_enabled():
                log.info("triton W4A8: tuning N=%d K=%d M<=%d on %s", n, k, b, gpu)
                cfg, us = best_config(n, k, b, candidates(n, k, b, sms, gpu_name=gpu), device, scaled)
                if cfg is not None:
                    cache.put(n, k, b, cfg, us, scaled)
                    log.info("triton W4A8: N=%d K=%d M<=%d -> %s (%.1f us)", n, k, b, cfg.key(), us)
            if cfg is None:
                cfg = heuristic(n, k, m, sms, gpu)
            self._configs[key] = cfg
            return cfg

    # -- the kernel protocol -------------------------------------------------------------------

    def mm(self, x_q: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
        cfg = self.config_for(w_packed.shape[0], x_q.shape[1], x_q.shape[0], x_q.device)
        return launch(x_q, w_packed.view(torch.int8), cfg)

    def linear(self, x_q, x_scale, w_packed, w_scale, bias, out_dtype) -> torch.Tensor:
        n, k = w_packed.shape[0], x_q.shape[1]
        if w_scale.dim() == 2 and w_scale.shape[1] != 1:
            raise ValueError(self.unsupported_reason(n, k, k // w_scale.shape[1], x_q.device))
        cfg = self.config_for(n, k, x_q.shape[0], x_q.device, scaled=True)
        return launch(x_q, w_packed.view(torch.int8), cfg, x_scale, w_scale, bias, out_dtype)


KERNEL = TritonW4A8Kernel()


def kernel_for(settings) -> TritonW4A8Kernel:
    """Triton has no per-compile settings: one instance (and its tuned tiles) serves every compile."""
    return KERNEL
