"""Measure candidate tile configurations of the Triton W4A8 kernel on the current GPU.

Each candidate is checked bit-exact against the reference before it is timed, so a configuration
that miscompiles (or races) can never be cached.  Timings use ``triton.testing.do_bench`` (median,
L2 flushed between runs), as weights of a real model are not L2 resident between layers.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton

from ..quant.int4_pack import pack_int4
from .reference import ReferenceKernel
from .triton_w4a8_launch import TileConfig, launch

log = logging.getLogger("quantvla_fx")


def random_problem(m: int, n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range int8 activations and int4 weights (never zeros: they hide unwritten outputs)."""
    gen = torch.Generator(device=device).manual_seed(1234 + m + n + k)
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device, generator=gen)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device, generator=gen)
    return x, pack_int4(w)


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
    ref = ReferenceKernel().mm(x_q, w_packed)
    n = w_packed.shape[0]
    xs = torch.rand(x_q.shape[0], 1, device=x_q.device) * 0.02 + 1e-3
    ws = torch.rand(n, device=x_q.device) * 0.02 + 1e-3
    lin_ref = (ref.double() * xs.double() * ws.double()) if scaled else None
    results = []
    for cfg in cfgs:
        try:
            out = launch(x_q, w_packed, cfg)
            bad = int((out != ref).sum())
            if scaled and not bad:
                lin = launch(x_q, w_packed, cfg, xs, ws, None, torch.bfloat16).double()
                bad = int(((lin - lin_ref).abs() > 2**-7 * lin_ref.abs().max()).sum())
            if bad:
                log.warning("triton W4A8 config %s is WRONG (%d mismatches); skipped", cfg.key(), bad)
                results.append((cfg, None, f"wrong: {bad} mismatches"))
                continue
            if scaled:
                fn = lambda: launch(x_q, w_packed, cfg, xs, ws, None, torch.bfloat16)  # noqa: E731
            else:
                fn = lambda: launch(x_q, w_packed, cfg)  # noqa: E731
            ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
            results.append((cfg, ms * 1000.0, "ok"))
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
