"""GPU timing shared by the benchmarks: CUDA-graph replays with the L2 cache flushed each time.

Each measured callable is captured into a CUDA graph together with a write of a buffer larger
than L2; a graph holding only that write is timed the same way and subtracted.  So every number
is a graph-launched, cold-cache time (weights come from HBM, as in a real multi-layer model), and
every variant is measured by the same code in the same run.
"""
from __future__ import annotations

import statistics

import torch

L2_FLUSH_BYTES = 256 << 20


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


def _replay_ms(g, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def time_us(fn, reps: int = 200) -> float:
    """Median µs of ``fn`` launched from a CUDA graph with a cold L2 (flush time subtracted)."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    g_fn = _capture(fn, flush)
    g_flush = _capture(lambda: None, flush)
    base = statistics.median(_replay_ms(g_flush, reps))
    t = statistics.median(_replay_ms(g_fn, reps))
    return max(t - base, 0.0) * 1e3
