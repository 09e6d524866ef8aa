"""``auto``: for each (GPU, N, K, M bucket, group size) the fastest kernel that is verified exact.

Candidates (``CANDIDATES``, via the registry; one that fails to load is skipped) are first checked
against the exact reference on random data of M = m_bucket rows, then timed (``measure``: Triton's
``do_bench`` median with an L2 flush, or CUDA events).  Only verified kernels can win; ``reference``
is always a candidate, so there is always an answer.  Choices are cached in a JSON file per GPU
model under ``QUANTVLA_CACHE_DIR`` (default ``~/.cache/quantvla_fx``), keyed by
``"{capability}|{n}|{k}|{m_bucket}|{group_size}"``; a cached choice is re-verified once per process
and re-measured when the set of kernels available on the device has changed.  The registry never
sends CPU tensors here (CPU always runs ``reference``); on any other device this works as is.
"""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
import threading
import time
from typing import Callable, Optional

import torch

from ..quant.int4_pack import pack_int4
from .registry import get_kernel

log = logging.getLogger("quantvla_fx")

CANDIDATES = ("triton", "bitblas", "reference")
_VERSION = 1
_LOCK = threading.RLock()
_FILES: dict[str, dict] = {}  # cache path -> its entries, loaded on first use
_CHECKED: set[tuple[str, str, str]] = set()  # (path, key, kernel) verified in this process


def cache_path(gpu_name: str) -> str:
    base = os.environ.get("QUANTVLA_CACHE_DIR") or os.path.expanduser("~/.cache/quantvla_fx")
    safe = re.sub(r"[^\w.-]+", "_", gpu_name)
    return os.path.join(base, f"auto_kernels_{safe}.json")


def _device_info(device: torch.device) -> tuple[str, str]:
    """(capability, model name) of the device; the device type for non-CUDA devices."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{major}.{minor}", torch.cuda.get_device_name(device)
    return device.type, device.type


def measure(kernel, run: Callable[[], object], device: torch.device) -> float:
    """Median time of ``run()`` in microseconds (tests replace this function)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return 1e3 * do_bench(run, warmup=10, rep=50, return_mode="median")
        for _ in range(5):
            run()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(1e3 * start.elapsed_time(end))
        return statistics.median(times)
    run()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        run()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def _inputs(n: int, k: int, m: int, group_size: int, device: torch.device) -> dict:
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device))
    groups = 1 if group_size == -1 else k // group_size
    w_scale = torch.rand(n, groups, device=device) * 1e-2 + 1e-3
    return {"x_q": x_q, "w": w, "x_scale": torch.rand(m, 1, device=device) * 1e-2 + 1e-3,
            "w_scale": w_scale[:, 0] if group_size == -1 else w_scale}


def _verify(kern, ref, inp: dict, group_size: int) -> Optional[str]:
    """None if ``kern`` gives the reference's exact int32 product (and grouped linear), else why not."""
    try:
        got = kern.mm(inp["x_q"], inp["w"])
        want = ref.mm(inp["x_q"], inp["w"])
        if got.dtype != torch.int32 or not torch.equal(got, want):
            return "int32 product differs from the reference"
        if group_size != -1:
            args = (inp["x_q"], inp["x_scale"], inp["w"], inp["w_scale"], None, torch.float32)
            got, want = kern.linear(*args), ref.linear(*args)
            if not torch.isfinite(got).all() or (got - want).norm() > 1e-4 * want.norm():
                return "grouped linear differs from the reference"
    except Exception as e:  # a kernel that crashes is as unusable as a wrong one
        return f"{type(e).__name__}: {str(e)[-300:]}"
    return None


def _runner(kern, inp: dict, group_size: int) -> Callable[[], object]:
    if group_size == -1:  # the exact integer GEMM: the part every epilogue shares
        return lambda: kern.mm(inp["x_q"], inp["w"])
    args = (inp["x_q"], inp["x_scale"], inp["w"], inp["w_scale"], None, torch.bfloat16)
    return lambda: kern.linear(*args)


def _kernel(name: str):
    try:
        return get_kernel(name)
    except (RuntimeError, KeyError) as e:
        log.debug("auto: kernel %s not loadable: %s", name, e)
        return None


def _available(device: torch.device) -> list[str]:
    names = []
    for name in CANDIDATES:
        kern = _kernel(name)
        if kern is not None and kern.unavailable_reason(device) is None:
            names.append(name)
    return names


def _measure_all(device, n, k, m_bucket, group_size, names) -> tuple[object, dict, dict]:
    ref = get_kernel("reference")
    inp = _inputs(n, k, m_bucket, group_size, device)
    times, skipped, kernels = {}, {}, {}
    for name in names:
        kern = _kernel(name)
        try:
            reason = kern.unsupported_reason(n, k, group_size, device)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        if reason is None and name != "reference":  # the reference defines "exact"
            reason = _verify(kern, ref, inp, group_size)
            if reason:
                log.warning("auto: %s is wrong for N=%d, K=%d, M=%d (%s); never chosen", name, n, k, m_bucket, reason)
        if reason:
            skipped[name] = reason
            continue
        try:
            times[name] = round(float(measure(kern, _runner(kern, inp, group_size), device)), 3)
            kernels[name] = kern
        except Exception as e:
            skipped[name] = f"timing failed: {type(e).__name__}: {str(e)[-300:]}"
    if not times:
        return ref, times, skipped
    best = min(times, key=times.get)
    return kernels[best], times, skipped


def _load(path: str) -> dict:
    if path not in _FILES:
        entries = {}
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") == _VERSION:
                entries = data.get("entries", {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("auto: ignoring unreadable kernel cache %s (%s)", path, e)
        _FILES[path] = entries
    return _FILES[path]


def _save(path: str, gpu: str, key: str, entry: dict) -> None:
    """Merge one entry into the file (another process may have added others) atomically."""
    _FILES.pop(path, None)
    entries = _load(path)
    entries[key] = entry
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": _VERSION, "gpu": gpu, "entries": entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _cached_choice(path, key, entry, available, device, n, k, m_bucket, group_size):
    """The cached kernel if it is still available, supported and (re)verified, else None."""
    if entry.get("available") != available or entry.get("kernel") not in available:
        return None
    kern = _kernel(entry["kernel"])
    if kern is None or kern.unsupported_reason(n, k, group_size, device) is not None:
        return None
    if (path, key, kern.name) not in _CHECKED and kern.name != "reference":
        why = _verify(kern, get_kernel("reference"), _inputs(n, k, m_bucket, group_size, device), group_size)
        if why:
            log.warning("auto: cached choice %s is wrong now for %s (%s); measuring again", kern.name, key, why)
            return None
    _CHECKED.add((path, key, kern.name))
    return kern


def select_kernel(device, n: int, k: int, m_bucket: int, group_size: int = -1):
    """The fastest verified kernel for this GEMM shape on ``device`` (measured once, then cached)."""
    device = torch.device(device)
    capability, gpu = _device_info(device)
    key = f"{capability}|{n}|{k}|{m_bucket}|{group_size}"
    path = cache_path(gpu)
    with _LOCK:
        available = _available(device)
        entry = _load(path).get(key)
        if entry is not None:
            kern = _cached_choice(path, key, entry, available, device, n, k, m_bucket, group_size)
            if kern is not None:
                log.debug("auto: %s -> %s (cached in %s)", key, kern.name, path)
                return kern
        kern, times, skipped = _measure_all(device, n, k, m_bucket, group_size, available)
        _save(path, gpu, key, {"kernel": kern.name, "times_us": times, "skipped": skipped, "available": available})
        _CHECKED.add((path, key, kern.name))
        shown = ", ".join(f"{name} {t:.1f} us" for name, t in sorted(times.items(), key=lambda it: it[1]))
        log.info("auto kernel for N=%d, K=%d, M<=%d, group %d on %s: %s (%s)%s", n, k, m_bucket, group_size,
                 gpu, kern.name, shown or "nothing measured", f"; skipped {skipped}" if skipped else "")
        return kern
