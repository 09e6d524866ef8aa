"""Which kernel runs a W4A16 GEMM: the forced one, or for ``auto`` the fastest verified one.

The W4A8 selector (kernels/select.py) with W4A16's registry, candidates, verification and cache
file (``auto_w4a16_<gpu>.json``): per (GPU, N, K, M bucket, group size) each candidate (triton,
dequant = dequantize to bf16 + cuBLAS, reference) is checked against the fp64 truth on random
data, then timed; ``reference`` is always a candidate.  CPU, and
activations the Triton kernel does not take (fp32), always run ``reference``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import cache
from ..registry import KernelRegistry
from ..select import Selector
from . import verify

log = logging.getLogger("quantvla_fx")

MODULES = {"reference": "quantvla_fx.kernels.w4a16.reference", "triton": "quantvla_fx.kernels.w4a16.triton_kernel",
           "dequant": "quantvla_fx.kernels.w4a16.dequant"}
REGISTRY = KernelRegistry(MODULES)
CANDIDATES = ("triton", "dequant", "reference")  # dequant: bf16 dequantize + cuBLAS, an auto-only GPU fallback


class W4A16Selector(Selector):
    def cache_path(self, gpu_name: str) -> Path:
        root = Path(self.cache_dir) if self.cache_dir is not None else cache.cache_root()
        return root / f"auto_w4a16_{cache.slug(gpu_name)}.json"

    def _cached_choice(self, path, key, entry, available, device, n, k, m, group_size, settings):
        if entry.get("available") != available or entry.get("kernel") not in available:
            return None
        kern = self._kernel(entry["kernel"], settings)
        if kern is None or kern.unsupported_reason(n, k, group_size, device) is not None:
            return None
        if (path, key, kern.name) not in self._checked and kern.name != "reference":
            why = verify.check_kernel(kern, n, k, m, group_size, device)
            if why:
                log.warning("auto W4A16: cached choice %s is wrong now for %s (%s); measuring again", kern.name, key, why)
                return None
        self._checked.add((path, key, kern.name))
        return kern

    def _measure_all(self, device, n, k, m, group_size, names, settings):
        x, w, s = verify.random_problem(m, n, k, group_size, torch.bfloat16, device)
        times, skipped, kernels = {}, {}, {}
        for name in names:
            kern = self._kernel(name, settings)
            reason = kern.unsupported_reason(n, k, group_size, device)
            if reason is None and name != "reference":
                reason = verify.check_kernel(kern, n, k, m, group_size, device)
                if reason:
                    log.warning("auto W4A16: %s is wrong for N=%d, K=%d, M=%d (%s); never chosen", name, n, k, m, reason)
            if reason:
                skipped[name] = reason
                continue
            try:
                times[name] = round(float(self.timer(kern, lambda kern=kern: kern.linear(x, w, s, None, torch.bfloat16),
                                                     device)), 3)
                kernels[name] = kern
            except Exception as e:
                skipped[name] = f"timing failed: {type(e).__name__}: {str(e)[-300:]}"
        if not times:
            return self.registry.get("reference"), times, skipped
        best = min(times, key=times.get)
        return kernels[best], times, skipped


DEFAULT = W4A16Selector(REGISTRY, CANDIDATES)


def resolve_kernel(arg: str, device, n: int, k: int, m: int, group_size: int, dtype: torch.dtype):
    """The W4A16 kernel for the op's ``kernel`` argument, this GEMM and activation dtype."""
    from ...kernel_support import parse_kernel_arg

    if parse_kernel_arg(arg)[0] == "auto" and dtype not in (torch.bfloat16, torch.float16):
        return REGISTRY.get("reference")
    return DEFAULT.resolve(arg, device, n, k, m, group_size)
