"""Kernel time by category for one call, from torch.profiler (used by bench_pi05.py).

Categories follow the end-to-end profile: attention, cuBLAS/cuDNN GEMMs, our W4A8 kernels,
Inductor's generated Triton kernels, everything else (copies, memsets, ...).  The launch count
is the number of GPU kernels of the call (kernels inside a CUDA graph are counted one by one).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch

_RULES = (  # first match wins; ours before the generic Triton rule
    ("w4a8", re.compile(r"w4a8|w4a16|bitblas|default_function_kernel", re.IGNORECASE)),
    ("attention", re.compile(r"attn|attention|sdpa|fmha|flash", re.IGNORECASE)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|triton_tem_", re.IGNORECASE)),
    ("inductor_triton", re.compile(r"^triton_", re.IGNORECASE)),
)
CATEGORIES = ("attention", "gemm", "w4a8", "inductor_triton", "other")


def category(kernel_name: str) -> str:
    for cat, rx in _RULES:
        if rx.search(kernel_name):
            return cat
    return "other"


def profile_call(fn) -> dict:
    """Run ``fn()`` once under the profiler: {by_category_ms, launches, top_kernels}."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if _is_copy(ev.name):  # time counts ("other"), but a memset/memcpy is not a kernel launch
            by_cat["other"] += us / 1e3
            continue
        by_cat[category(ev.name)] += us / 1e3
        per_kernel[ev.name] += us
        calls[ev.name] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "by_category_ms": {c: round(by_cat.get(c, 0.0), 3) for c in CATEGORIES},
        "launches": int(sum(calls.values())),
        "top_kernels": [{"kernel": k[:100], "us": round(v, 1), "calls": calls[k]} for k, v in top],
    }


def _is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset", "[memory]"))
