"""Tuning the Triton W4A8 kernel: time the candidate tiles once per GPU and shape, remember the best.

Each candidate is checked against the reference (kernels/verify.py) before it is timed
(kernels/timing.py), so a configuration that miscompiles (or races) can never be cached.  The
winners live in ``<cache>/triton/<gpu name>.json`` (kernels/cache.py), stamped with the triton
version: another version's file is ignored and tuned again.
"""
from __future__ import annotations

import logging
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
import triton

from .. import cache, timing, verify
from .launch import TileConfig, launch

log = logging.getLogger("quantvla_fx")
_PACKAGE = "quantvla_fx.kernels.triton"


def random_problem(m: int, n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range int8 activations and packed int4 weights for an [m, k] x [n, k]ᵀ GEMM."""
    return verify.random_problem(m, n, k, device)


def time_configs(
    x_q: torch.Tensor,
    w_packed: torch.Tensor,
    cfgs: list[TileConfig],
    scaled: bool = False,
    warmup_ms: int = 10,
    rep_ms: int = 40,
) -> list[tuple[TileConfig, Optional[float], str]]:
    """(config, median µs or None, note) for each candidate; wrong or failing ones get None.

    ``scaled`` times the fused-epilogue kernel (bf16 out), which uses more registers than the
    int32 one and can prefer other tiles.  Either way the int32 result must be bit-exact.
    """
    n, k, m = w_packed.shape[0], x_q.shape[1], x_q.shape[0]
    xs, ws = verify.random_scales(m, n, k, -1, x_q.device)
    want = verify.REFERENCE.mm(x_q, w_packed)
    want_lin = verify.REFERENCE.linear(x_q, xs, w_packed, ws, None, torch.float32) if scaled else None
    results = []
    for cfg in cfgs:

        def mm(x, w, cfg=cfg):
            return launch(x, w, cfg)

        def linear(x, x_scale, w, w_scale, bias, out_dtype, cfg=cfg):
            return launch(x, w, cfg, x_scale, w_scale, bias, out_dtype)

        try:
            why = verify.mm_error(mm, x_q, w_packed, want)
            if scaled and why is None:
                why = verify.linear_error(linear, x_q, xs, w_packed, ws, torch.bfloat16, want_lin)
            if why:
                log.warning("triton W4A8 config %s is WRONG (%s); skipped", cfg.key(), why)
                results.append((cfg, None, f"wrong: {why}"))
                continue
            if scaled:
                fn = lambda: launch(x_q, w_packed, cfg, xs, ws, None, torch.bfloat16)  # noqa: E731
            else:
                fn = lambda: launch(x_q, w_packed, cfg)  # noqa: E731
            results.append((cfg, timing.median_us(fn, x_q.device, warmup_ms, rep_ms), "ok"))
        except Exception as e:  # e.g. out of shared memory for this tile on this GPU
            log.debug("triton W4A8 config %s failed: %s", cfg.key(), e)
            results.append((cfg, None, f"failed: {type(e).__name__}: {str(e)[:200]}"))
    return results


def best_config(
    n: int, k: int, m: int, cfgs: list[TileConfig], device, scaled: bool = False
) -> tuple[Optional[TileConfig], float]:
    """The fastest exact candidate for an [m, k] × [n, k]ᵀ GEMM, and its time in µs."""
    x, w = random_problem(m, n, k, device)
    timed = [(c, us) for c, us, _ in time_configs(x, w, cfgs, scaled) if us is not None]
    if not timed:
        return None, float("inf")
    return min(timed, key=lambda t: t[1])


def cache_path(gpu_name: str) -> Path:
    return cache.cache_root() / "triton" / f"{cache.slug(gpu_name)}.json"


@lru_cache(maxsize=None)
def shipped_table(gpu_name: str) -> dict:
    """Winners tuned once on this GPU model and shipped with the package (``configs/tuned/<gpu>.json``,
    copied from a tuning cache), so a first compile on that GPU does not spend minutes tuning.

    Any triton version's table is used: a tile is a launch configuration, valid across versions;
    what it costs at most is speed, and the local cache (tuned here) takes precedence.
    """
    f = resources.files(_PACKAGE).joinpath("configs", "tuned", f"{cache.slug(gpu_name)}.json")
    if not f.is_file():
        return {}
    try:
        entries = json.loads(f.read_text()).get("entries", {})
    except ValueError as e:
        log.warning("triton W4A8: ignoring unreadable shipped tile table %s (%s)", f, e)
        return {}
    return entries if isinstance(entries, dict) else {}


class ConfigCache:
    """Tuned configurations for one GPU model, persisted; safe to share between threads.

    Lookups read this machine's cache first, then the table shipped for the GPU model."""

    def __init__(self, gpu_name: str):
        self.gpu_name = gpu_name
        self.path = cache_path(gpu_name)
        self._store = cache.JsonStore(self.path, {"gpu": gpu_name, "triton": triton.__version__})

    @staticmethod
    def key(n: int, k: int, m_bucket: int, scaled: bool) -> str:
        return f"{'linear' if scaled else 'mm'}_N{n}_K{k}_M{m_bucket}"

    def get(self, n: int, k: int, m_bucket: int, scaled: bool = False) -> Optional[TileConfig]:
        key = self.key(n, k, m_bucket, scaled)
        d = self._store.get(key) or shipped_table(self.gpu_name).get(key)
        return TileConfig.from_dict(d["config"]) if d else None

    def put(self, n: int, k: int, m_bucket: int, cfg: TileConfig, us: float, scaled: bool = False) -> None:
        self._store.put(self.key(n, k, m_bucket, scaled), {"config": cfg.to_dict(), "us": round(us, 3)})
