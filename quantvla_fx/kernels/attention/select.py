"""Which kernel runs ``quantvla::attention``: the forced one, or ``auto``'s device/shape rule.

The rules live in ``quantvla_fx.attention_support`` (so the pass and the config can state them
without importing a kernel): reference on CPU and for fp32; on CUDA PyTorch's fused SDPA for calls
without padding and Triton split-KV for the others.  A forced kernel
that cannot run here is an error naming the reason.  Kernel modules are imported on first use.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable

import torch

from ...attention_support import auto_choice, cannot_run

MODULES = {
    "reference": "quantvla_fx.kernels.attention.reference",
    "splitkv": "quantvla_fx.kernels.attention.triton_splitkv",
    "flash": "quantvla_fx.kernels.attention.triton_flash",
    "torch": "quantvla_fx.kernels.attention.torch_fused",
}


@lru_cache(maxsize=None)
def _impl(name: str) -> Callable:
    return importlib.import_module(MODULES[name]).attention


def choose(kernel: str, device: torch.device, dtype: torch.dtype, lq: int, d: int, padded: bool = True) -> str:
    if kernel == "auto":
        return auto_choice(device, dtype, lq, d, padded)
    reason = cannot_run(kernel, device, dtype, d)
    if reason:
        raise RuntimeError(f"quantvla::attention: kernel {kernel!r} cannot run on {device} ({dtype}, head_dim {d}): "
                           f"{reason}. Use attention='auto' to fall back to a kernel that can.")
    return kernel


def resolve(kernel: str, device: torch.device, dtype: torch.dtype, lq: int, d: int, padded: bool = True) -> Callable:
    """The attention function for the op's ``kernel`` argument and this call's shape."""
    return _impl(choose(kernel, device, dtype, lq, d, padded))
