"""The ``bitblas`` W4A8 kernel: BitBLAS 0.1.0.post1 int8 × int4 -> exact int32, scales in torch.

One ``bitblas.Matmul`` per (N, K) with dynamic M buckets, ``propagate_a=False, propagate_b=False``
(so it reads our canonical [N, K/2] offset-binary weights as they are) and a zeroed int32 output
(tuned split-K kernels accumulate into it).  Operators are built on first use, kept in memory and
in BitBLAS's operator database under ``QUANTVLA_BITBLAS_CACHE`` (default
``<QUANTVLA_CACHE_DIR>/bitblas/<gpu-name>``), and each is checked once against the exact reference
before it is used; one that is wrong is refused, and ``unsupported_reason`` then says why, so
``auto`` falls back.  One kernel object per compile settings (tuning, M buckets: ``kernel_for``),
so two compiles never change each other's operators.  The ctypes launch happens here, inside the
custom op's implementation, never in traced code.  bitblas is imported lazily: this module
imports on a CPU-only box without it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

import torch

from ...kernel_support import DEFAULT_SETTINGS, KernelSettings, device_reason, shape_reason
from .. import cache, verify
from . import build, env

log = logging.getLogger("quantvla_fx")

DEFAULT_OPT_M = (16, 32, 64, 128, 256, 512, 1024)
# One M beyond the last bucket exercises the "larger M uses the last kernel" dispatch.
CHECK_MS = (1, 17, 100)


def opt_m(settings: KernelSettings) -> tuple[int, ...]:
    """The M buckets operators are built for: the settings', else the default ones."""
    return settings.opt_m or DEFAULT_OPT_M


def cache_dir() -> str:
    """Where BitBLAS operators (and our nvrtc shim) live; per GPU model unless set explicitly."""
    if os.environ.get("QUANTVLA_BITBLAS_CACHE"):
        return os.environ["QUANTVLA_BITBLAS_CACHE"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
    return str(cache.cache_root() / "bitblas" / cache.slug(gpu))


class BitBLASKernel:
    name = "bitblas"

    def __init__(self, settings: KernelSettings = DEFAULT_SETTINGS):
        self.settings = settings
        self._lock = threading.RLock()
        self._ops: dict[tuple, object] = {}  # (n, k, opt_m, tuning) -> verified bitblas.Matmul
        self._refused: dict[tuple, str] = {}  # same key -> why it is not used
        self._device_reason: dict[int, Optional[str]] = {}
        self._stores: dict[str, build.OperatorStore] = {}
        self.build_seconds: dict[tuple[int, int], float] = {}  # for benchmarks/bitblas_check.py

    # -- availability -------------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """The shape-free rules (kernel_support), then whether bitblas imports here (once per GPU)."""
        device = torch.device(device)
        reason = device_reason(self.name, device)
        if reason:
            return reason
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._device_reason:
            try:
                env.import_bitblas(cache_dir())
                self._device_reason[idx] = None
            except RuntimeError as e:
                self._device_reason[idx] = str(e)
        return self._device_reason[idx]

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        """Shape limits first; then builds and checks the operator once (cached), reporting failures."""
        reason = shape_reason(self.name, n, k, group_size) or self.unavailable_reason(device)
        if reason:
            return reason
        try:
            self.operator(n, k, torch.device(device))
        except RuntimeError as e:
            return str(e)
        return None

    # -- building -----------------------------------------------------------------------------
    def _key(self, n: int, k: int) -> tuple:
        return (n, k, opt_m(self.settings), self.settings.enable_tuning)

    def operator(self, n: int, k: int, device: torch.device):
        """The verified ``bitblas.Matmul`` for (N, K); builds on first use, raises if refused."""
        key = self._key(n, k)
        op = self._ops.get(key)
        if op is not None:
            return op
        with self._lock:
            if key in self._ops:
                return self._ops[key]
            if key in self._refused:
                raise RuntimeError(self._refused[key])
            reason = self.unavailable_reason(device)
            if reason:
                raise RuntimeError(reason)
            try:
                self._ops[key] = self._build_verified(key, device)
            except Exception as e:  # any failure to build or verify means: do not use it
                msg = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
                self._refused[key] = f"bitblas N={n}, K={k}: {msg}"
                log.warning("refusing the bitblas kernel: %s", self._refused[key])
                raise RuntimeError(self._refused[key]) from None
            return self._ops[key]

    def _build_verified(self, key: tuple, device: torch.device):
        n, k, ms, tuning = key
        bitblas = env.import_bitblas(cache_dir())
        major, minor = torch.cuda.get_device_capability(device)
        sm = 10 * major + minor
        if build.needs_ampere_path(sm):
            build.install_compile_overrides(sm)
        target = build.target_for(sm, bitblas)
        db = os.path.join(cache_dir(), "tuned" if tuning else "default")
        if db not in self._stores:  # BitBLAS's database, read once per directory
            self._stores[db] = build.OperatorStore(bitblas, db, target)
        store = self._stores[db]
        config = build.matmul_config(bitblas, n, k, ms)
        check_ms = CHECK_MS + (ms[-1] + 7,)
        cached = store.get(config)
        if cached is not None:
            why = verify.check_mm(lambda x, w: self._launch(cached, x, w, n), n, k, device, check_ms)
            if why is None:
                log.info("bitblas: N=%d, K=%d loaded from %s and verified", n, k, db)
                return cached
            log.warning("bitblas: cached operator N=%d, K=%d is wrong (%s); rebuilding", n, k, why)
            store.forget(config)
        log.info("bitblas: building int8×int4 kernel N=%d, K=%d, M buckets %s%s (first use; cached in %s)",
                 n, k, list(ms), ", tuning" if tuning else "", db)
        t0 = time.perf_counter()
        op = build.build_operator(bitblas, config, target, tuning)
        self.build_seconds[(n, k)] = time.perf_counter() - t0
        why = verify.check_mm(lambda x, w: self._launch(op, x, w, n), n, k, device, check_ms)
        if why is not None:
            raise RuntimeError(f"self-check against the reference failed: {why}")
        store.save(config, op)
        log.info("bitblas: N=%d, K=%d built in %.1f s and verified exact", n, k, self.build_seconds[(n, k)])
        return op

    # -- running ------------------------------------------------------------------------------
    @staticmethod
    def _launch(op, x_q: torch.Tensor, w_packed: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros((x_q.shape[0], n), dtype=torch.int32, device=x_q.device)
        if x_q.shape[0]:
            op(x_q, w_packed, output=out)  # raw pointers: inputs must be contiguous int8 on one device
        return out

    def mm(self, x_q: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
        if x_q.dtype != torch.int8 or w_packed.dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"bitblas mm needs int8 x_q and int8 w_packed, got {x_q.dtype}, {w_packed.dtype}")
        if x_q.device != w_packed.device:
            raise ValueError(f"bitblas mm: x_q on {x_q.device} but w_packed on {w_packed.device}")
        n, k = w_packed.shape[0], 2 * w_packed.shape[1]
        op = self.operator(n, k, x_q.device)
        return self._launch(op, x_q.contiguous(), w_packed.contiguous().view(torch.int8), n)

    def linear(self, x_q, x_scale, w_packed, w_scale, bias, out_dtype) -> torch.Tensor:
        if w_scale.dim() != 1:
            raise RuntimeError("the bitblas kernel supports per-output-channel weight scales only")
        out = self.mm(x_q, w_packed).float() * x_scale.float() * w_scale.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)


_BY_SETTINGS: dict[KernelSettings, BitBLASKernel] = {}  # keyed by the settings: safe to share
_BY_SETTINGS_LOCK = threading.Lock()


def kernel_for(settings: KernelSettings) -> BitBLASKernel:
    """The kernel (and its operators) for one set of compile settings."""
    with _BY_SETTINGS_LOCK:
        if settings not in _BY_SETTINGS:
            _BY_SETTINGS[settings] = BitBLASKernel(settings)
        return _BY_SETTINGS[settings]


KERNEL = kernel_for(DEFAULT_SETTINGS)
