"""The ``bitblas`` W4A8 kernel: BitBLAS 0.1.0.post1 int8 × int4 -> exact int32, scales in torch.

One ``bitblas.Matmul`` per (N, K) with dynamic M buckets, ``propagate_a=False, propagate_b=False``
(so it reads our canonical [N, K/2] offset-binary weights as they are) and a zeroed int32 output
(tuned split-K kernels accumulate into it).  Operators are built on first use, kept in memory and
in BitBLAS's operator database under ``QUANTVLA_BITBLAS_CACHE`` (default
``~/.cache/quantvla_fx/bitblas/<gpu-name>``), and each is checked once against the exact reference
before it is used; one that is wrong is refused, and ``unsupported_reason`` then says why, so
``auto`` falls back.  The ctypes launch happens here, inside the custom op's implementation, never
in traced code.  bitblas is imported lazily: this module imports on a CPU-only box without it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Optional, Sequence

import torch

from ..quant.int4_pack import pack_int4
from . import bitblas_build as build
from . import bitblas_env as env
from .registry import get_kernel, register_kernel

log = logging.getLogger("quantvla_fx")

DEFAULT_OPT_M = (16, 32, 64, 128, 256, 512, 1024)
_SETTINGS: dict = {"enable_tuning": None, "opt_m": None, "cache_dir": None}
_RESOLVED_SETTINGS: list = []  # (opt_m, enable_tuning) read once: mm() runs on every call
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def configure(enable_tuning: Optional[bool] = None, opt_m: Optional[Sequence[int]] = None,
              cache_dir: Optional[str] = None) -> None:
    """Override ``OPENPI_BITBLAS_ENABLE_TUNING`` / ``OPENPI_BITBLAS_OPT_M`` / ``QUANTVLA_BITBLAS_CACHE``.

    Applies to operators built afterwards (each is keyed by its settings); the environment is read
    once, at the first build.  Empty ``opt_m`` means the default buckets.
    """
    if enable_tuning is not None:
        _SETTINGS["enable_tuning"] = bool(enable_tuning)
    if opt_m is not None:
        _SETTINGS["opt_m"] = _legal_opt_m(opt_m)
    if cache_dir is not None:
        _SETTINGS["cache_dir"] = os.fspath(cache_dir)
    _RESOLVED_SETTINGS.clear()


def _legal_opt_m(values) -> tuple[int, ...]:
    ms = tuple(sorted({int(v) for v in values}))
    if any(m <= 0 for m in ms):
        raise ValueError(f"opt_m={ms}: token counts must be positive")
    return ms or DEFAULT_OPT_M


def enable_tuning() -> bool:
    if _SETTINGS["enable_tuning"] is not None:
        return _SETTINGS["enable_tuning"]
    v = os.environ.get("OPENPI_BITBLAS_ENABLE_TUNING", "").strip().lower()
    if v not in _TRUE + _FALSE:
        raise ValueError(f"OPENPI_BITBLAS_ENABLE_TUNING={v!r} is not a boolean (use 0 or 1)")
    return v in _TRUE


def opt_m() -> tuple[int, ...]:
    if _SETTINGS["opt_m"] is not None:
        return _SETTINGS["opt_m"]
    v = os.environ.get("OPENPI_BITBLAS_OPT_M", "").replace(" ", "")
    try:
        return _legal_opt_m(p for p in v.split(",") if p)
    except ValueError as e:
        raise ValueError(f"OPENPI_BITBLAS_OPT_M={v!r}: {e}") from None


def cache_dir() -> str:
    """Where BitBLAS operators (and our nvrtc shim) live; per GPU model unless set explicitly."""
    if _SETTINGS["cache_dir"]:
        return _SETTINGS["cache_dir"]
    if os.environ.get("QUANTVLA_BITBLAS_CACHE"):
        return os.environ["QUANTVLA_BITBLAS_CACHE"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
    return os.path.join(os.path.expanduser("~/.cache/quantvla_fx/bitblas"), re.sub(r"[^\w.-]+", "_", gpu))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _exact_check(run, n: int, k: int, device: torch.device, ms: Sequence[int]) -> Optional[str]:
    """None if ``run(x_q, w_packed)`` equals the exact reference on random data, else why not."""
    ref = get_kernel("reference")
    g = torch.Generator(device=device).manual_seed(n * 7919 + k)
    w = pack_int4(torch.randint(-8, 8, (n, k), device=device, dtype=torch.int8, generator=g))
    for m in ms:
        x = torch.randint(-128, 128, (m, k), device=device, dtype=torch.int8, generator=g)
        got, want = run(x, w), ref.mm(x, w)
        if got.shape != want.shape or got.dtype != torch.int32:
            return f"returned {tuple(got.shape)} {got.dtype} for M={m}, expected {tuple(want.shape)} int32"
        bad = int((got != want).sum())
        if bad:
            return f"wrong results at M={m}: {bad} of {got.numel()} int32 outputs differ from the reference"
    return None


class BitBLASKernel:
    name = "bitblas"

    def __init__(self):
        self._lock = threading.RLock()
        self._ops: dict[tuple, object] = {}  # (n, k, opt_m, tuning) -> verified bitblas.Matmul
        self._refused: dict[tuple, str] = {}  # same key -> why it is not used
        self._device_reason: dict[int, Optional[str]] = {}
        self._stores: dict[str, build.OperatorStore] = {}
        self.build_seconds: dict[tuple[int, int], float] = {}  # for benchmarks/bitblas_check.py

    # -- availability -------------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return f"the bitblas kernel needs a CUDA device, got {device}."
        if not env.bitblas_installed():
            return "bitblas is not installed (pip install quantvla-fx[bitblas])."
        if not torch.cuda.is_available():
            return "the bitblas kernel needs a CUDA device, but torch.cuda.is_available() is False."
        idx = _device_index(device)
        if idx not in self._device_reason:
            self._device_reason[idx] = self._probe(idx)
        return self._device_reason[idx]

    def _probe(self, idx: int) -> Optional[str]:
        if idx != 0:
            # BitBLAS 0.1.0.post1 queries and initialises its kernels on CUDA device 0 only.
            return f"bitblas 0.1.0.post1 runs on CUDA device 0 only (got cuda:{idx}); use CUDA_VISIBLE_DEVICES."
        major, minor = torch.cuda.get_device_capability(idx)
        if major < 8:
            return f"the bitblas int8 kernel needs compute capability 8.0 or newer (int8 mma.sync); this GPU is {major}.{minor}."
        try:
            env.import_bitblas(cache_dir())
        except RuntimeError as e:
            return str(e)
        return None

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        """Shape limits first; then builds and checks the operator once (cached), reporting failures."""
        if group_size != -1:
            return (f"group_size={group_size}: the bitblas kernel supports one weight scale per output "
                    "channel only (BitBLAS cannot apply scales to int8 × int4 products in-kernel).")
        if k % 32:
            return f"K={k} is not a multiple of 32, which BitBLAS's int8 tensor-core kernel needs."
        if n % 16:
            return f"N={n} is not a multiple of 16, which BitBLAS's kernel tiles need."
        reason = self.unavailable_reason(device)
        if reason:
            return reason
        try:
            self.operator(n, k, torch.device(device))
        except RuntimeError as e:
            return str(e)
        return None

    # -- building -----------------------------------------------------------------------------
    def _key(self, n: int, k: int) -> tuple:
        if not _RESOLVED_SETTINGS:
            _RESOLVED_SETTINGS.append((opt_m(), enable_tuning()))
        return (n, k, *_RESOLVED_SETTINGS[0])

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
        # One M beyond the last bucket exercises the "larger M uses the last kernel" dispatch.
        check_ms = (1, 17, 100, ms[-1] + 7)
        cached = store.get(config)
        if cached is not None:
            why = _exact_check(lambda x, w: self._launch(cached, x, w, n), n, k, device, check_ms)
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
        why = _exact_check(lambda x, w: self._launch(op, x, w, n), n, k, device, check_ms)
        if why is not None:
            raise RuntimeError(f"self-check against the reference failed: {why}")
        store.save(config, op)
        log.info("bitblas: N=%d, K=%d built in %.1f s and verified exact", n, k, self.build_seconds[(n, k)])
        return op

    def prebuild(self, shapes: Sequence[tuple[int, int]], device="cuda") -> dict[tuple[int, int], Optional[str]]:
        """Build (or load) and verify the operators for these (N, K) ahead of time, with progress."""
        from tqdm.auto import tqdm

        device = torch.device(device)
        out = {}
        for n, k in tqdm(list(dict.fromkeys(shapes)), desc="bitblas kernels", unit="shape"):
            out[(n, k)] = self.unsupported_reason(n, k, -1, device)
        return out

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


KERNEL = register_kernel(BitBLASKernel())
