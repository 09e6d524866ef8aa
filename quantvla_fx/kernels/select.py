"""Which kernel runs a W4A8 GEMM: the forced one, or for ``auto`` the fastest verified one.

The custom ops call :func:`resolve_kernel` at call time, never the passes.  For ``auto``, per
(GPU, N, K, M bucket, group size) each candidate (one that fails to load is skipped) is first
checked exact against the reference on random data of M = m_bucket rows (kernels/verify.py),
then timed (kernels/timing.py); only verified kernels can win, and ``reference`` is always a
candidate, so there is always an answer.  Choices are cached on disk per GPU model
(kernels/cache.py: ``auto_kernels_<gpu>.json``, keyed ``"{capability}|{n}|{k}|{m_bucket}|{group}"``);
a cached choice is re-verified once per selector and re-measured when the set of kernels
available on the device has changed.  CPU always runs ``reference``.

A ``Selector`` holds all of this state; the ops use ``DEFAULT``.  Tests build their own with
their own registry, candidates, timer and cache directory.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..kernel_support import DEFAULT_SETTINGS, KernelSettings, m_bucket, parse_kernel_arg
from . import cache, timing, verify
from .registry import REGISTRY, KernelRegistry, W4A8Kernel

log = logging.getLogger("quantvla_fx")

CANDIDATES = ("triton", "bitblas", "reference")
_VERSION = 1
# timer(kernel, run, device) -> median µs of run()
Timer = Callable[[W4A8Kernel, Callable[[], object], torch.device], float]


def _median_us(kern, run, device) -> float:
    return timing.median_us(run, device)


class Selector:
    """Resolves the op's kernel argument; measures and remembers ``auto``'s choices."""

    def __init__(self, registry: KernelRegistry = REGISTRY, candidates: Sequence[str] = CANDIDATES,
                 timer: Timer = _median_us, cache_dir=None):
        self.registry = registry
        self.candidates = tuple(candidates)
        self.timer = timer
        self.cache_dir = cache_dir  # None: cache.cache_root() at each selection
        self._lock = threading.RLock()
        self._stores: dict[Path, cache.JsonStore] = {}
        self._checked: set[tuple] = set()  # (path, key, kernel) verified by this selector
        self._resolved: dict[tuple, W4A8Kernel] = {}

    # -- the op's entry point ------------------------------------------------------------------
    def resolve(self, arg: str, device, n: int, k: int, m: int, group_size: int = -1) -> W4A8Kernel:
        """The kernel for ``arg`` (``kernel_support.kernel_arg``) and this GEMM; raises if forced and unable."""
        device = torch.device(device)
        key = (arg, device.type, device.index, n, k, m_bucket(m), group_size)
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        choice, settings = parse_kernel_arg(arg)
        if choice == "auto":
            if device.type == "cpu":
                kern = self.registry.get("reference")
            else:
                kern = self.select(device, n, k, m_bucket(m), group_size, settings)
        else:
            kern = self.registry.get(choice, settings)
            reason = kern.unavailable_reason(device) or kern.unsupported_reason(n, k, group_size, device)
            if reason:
                raise RuntimeError(f"quantvla kernel {choice!r} cannot run N={n}, K={k} on {device}: {reason}")
        self._resolved[key] = kern
        return kern

    # -- auto ----------------------------------------------------------------------------------
    def cache_path(self, gpu_name: str) -> Path:
        root = Path(self.cache_dir) if self.cache_dir is not None else cache.cache_root()
        return root / f"auto_kernels_{cache.slug(gpu_name)}.json"

    def _store(self, path: Path, gpu: str) -> cache.JsonStore:
        if path not in self._stores:
            self._stores[path] = cache.JsonStore(path, {"version": _VERSION, "gpu": gpu})
        return self._stores[path]

    def _kernel(self, name: str, settings: KernelSettings) -> Optional[W4A8Kernel]:
        try:
            return self.registry.get(name, settings)
        except (RuntimeError, KeyError) as e:
            log.debug("auto: kernel %s not loadable: %s", name, e)
            return None

    def _available(self, device, settings) -> list[str]:
        names = []
        for name in self.candidates:
            kern = self._kernel(name, settings)
            if kern is not None and kern.unavailable_reason(device) is None:
                names.append(name)
        return names

    def select(self, device, n: int, k: int, m_bucket: int, group_size: int = -1,
               settings: KernelSettings = DEFAULT_SETTINGS) -> W4A8Kernel:
        """The fastest verified kernel for this GEMM shape on ``device`` (measured once, then cached)."""
        device = torch.device(device)
        capability, gpu = cache.device_identity(device)
        key = f"{capability}|{n}|{k}|{m_bucket}|{group_size}"
        path = self.cache_path(gpu)
        with self._lock:
            store = self._store(path, gpu)
            available = self._available(device, settings)
            entry = store.get(key)
            if entry is not None:
                kern = self._cached_choice(path, key, entry, available, device, n, k, m_bucket, group_size, settings)
                if kern is not None:
                    log.debug("auto: %s -> %s (cached in %s)", key, kern.name, path)
                    return kern
            kern, times, skipped = self._measure_all(device, n, k, m_bucket, group_size, available, settings)
            store.put(key, {"kernel": kern.name, "times_us": times, "skipped": skipped, "available": available})
            self._checked.add((path, key, kern.name))
            shown = ", ".join(f"{name} {t:.1f} us" for name, t in sorted(times.items(), key=lambda it: it[1]))
            log.info("auto kernel for N=%d, K=%d, M<=%d, group %d on %s: %s (%s)%s", n, k, m_bucket, group_size,
                     gpu, kern.name, shown or "nothing measured", f"; skipped {skipped}" if skipped else "")
            return kern

    def _cached_choice(self, path, key, entry, available, device, n, k, m, group_size, settings):
        """The cached kernel if it is still available, supported and (re)verified, else None."""
        if entry.get("available") != available or entry.get("kernel") not in available:
            return None
        kern = self._kernel(entry["kernel"], settings)
        if kern is None or kern.unsupported_reason(n, k, group_size, device) is not None:
            return None
        if (path, key, kern.name) not in self._checked and kern.name != "reference":
            why = verify.check_kernel(kern, n, k, m, group_size, device)
            if why:
                log.warning("auto: cached choice %s is wrong now for %s (%s); measuring again", kern.name, key, why)
                return None
        self._checked.add((path, key, kern.name))
        return kern

    def _measure_all(self, device, n, k, m, group_size, names, settings):
        """(fastest verified kernel, {name: µs}, {name: why skipped}) over ``names``."""
        x_q, w = verify.random_problem(m, n, k, device)
        x_scale, w_scale = verify.random_scales(m, n, k, group_size, device)
        times, skipped, kernels = {}, {}, {}
        for name in names:
            kern = self._kernel(name, settings)
            try:
                reason = kern.unsupported_reason(n, k, group_size, device)
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
            if reason is None and name != "reference":  # the reference defines "exact"
                reason = verify.check_kernel(kern, n, k, m, group_size, device)
                if reason:
                    log.warning("auto: %s is wrong for N=%d, K=%d, M=%d (%s); never chosen", name, n, k, m, reason)
            if reason:
                skipped[name] = reason
                continue
            if group_size == -1:  # the exact integer GEMM: the part every epilogue shares
                run = lambda kern=kern: kern.mm(x_q, w)  # noqa: E731
            else:
                run = lambda kern=kern: kern.linear(x_q, x_scale, w, w_scale, None, torch.bfloat16)  # noqa: E731
            try:
                times[name] = round(float(self.timer(kern, run, device)), 3)
                kernels[name] = kern
            except Exception as e:
                skipped[name] = f"timing failed: {type(e).__name__}: {str(e)[-300:]}"
        if not times:
            return self.registry.get("reference"), times, skipped
        best = min(times, key=times.get)
        return kernels[best], times, skipped


DEFAULT = Selector()


def resolve_kernel(arg: str, device, n: int, k: int, m: int, group_size: int = -1) -> W4A8Kernel:
    """The kernel that runs this GEMM for the op's ``kernel`` argument (the default selector)."""
    return DEFAULT.resolve(arg, device, n, k, m, group_size)
