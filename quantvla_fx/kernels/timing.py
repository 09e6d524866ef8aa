"""GPU timing, one implementation for kernel selection, tile tuning and the benchmarks.

``median_us`` is what choosing needs: a quick median per candidate (Triton's ``do_bench``, which
flushes the L2 before every run, as weights of a real model are not L2 resident between layers;
CUDA events without triton; ``perf_counter`` off the GPU).  ``graph_us`` is what the benchmarks
report: CUDA-graph replays, each with a write of a buffer larger than L2, minus a graph holding
only that write, so every number is a graph-launched, cold-cache time measured by the same code.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 << 20


def median_us(run: Callable[[], object], device, warmup_ms: int = 10, rep_ms: int = 50) -> float:
    """Median time of ``run()`` in microseconds on ``device``."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return 1e3 * do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        for _ in range(5):
            run()
        return statistics.median(1e3 * ms for ms in _event_ms(run, 30))
    run()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        run()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def _event_ms(run: Callable[[], object], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def events_us(run: Callable[[], object], reps: int = 30) -> float:
    """Median µs of ``run()`` between CUDA events (no warm-up, no flush): when graphs cannot capture."""
    return 1e3 * statistics.median(_event_ms(run, reps))


def _capture(fn, flush):
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up (compilation, autotuning, pack caches) outside the graph
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flush.zero_()
        if fn is not None:
            fn()
    return g


def graph_us(fn, reps: int = 200) -> float:
    """Median µs of ``fn`` launched from a CUDA graph with a cold L2 (flush time subtracted)."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    g_fn = _capture(fn, flush)
    g_flush = _capture(lambda: None, flush)
    base = statistics.median(_event_ms(g_flush.replay, reps))
    t = statistics.median(_event_ms(g_fn.replay, reps))
    return max(t - base, 0.0) * 1e3
