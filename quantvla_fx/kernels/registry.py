"""Kernel registry: which W4A8 implementation runs for a given device and GEMM shape.

A kernel is an object with ``name``, ``unavailable_reason(device)``, ``unsupported_reason(n, k,
group_size, device)``, ``mm(x_q, w_packed) -> int32`` and ``linear(x_q, x_scale, w_packed, w_scale,
bias, out_dtype)``.  Optional kernels (bitblas, triton) are imported lazily so that a CPU-only
install never touches CUDA libraries.
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional, Protocol

import torch

log = logging.getLogger("quantvla_fx")

KERNEL_CHOICES = ("auto", "reference", "bitblas", "triton")
# Modules that register the optional kernels when imported.
_LAZY_MODULES = {
    "reference": "quantvla_fx.kernels.reference",
    "triton": "quantvla_fx.kernels.triton_w4a8",
    "bitblas": "quantvla_fx.kernels.bitblas",
}


class W4A8Kernel(Protocol):
    name: str

    def unavailable_reason(self, device: torch.device) -> Optional[str]: ...

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]: ...

    def mm(self, x_q: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor: ...

    def linear(self, x_q, x_scale, w_packed, w_scale, bias, out_dtype) -> torch.Tensor: ...


_KERNELS: dict[str, W4A8Kernel] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_RESOLVED: dict[tuple, W4A8Kernel] = {}


def register_kernel(kernel: W4A8Kernel) -> W4A8Kernel:
    _KERNELS[kernel.name] = kernel
    _RESOLVED.clear()
    return kernel


def get_kernel(name: str) -> W4A8Kernel:
    """The kernel called ``name``; raises with the reason when it cannot be imported."""
    if name not in _KERNELS and name in _LAZY_MODULES and name not in _IMPORT_ERRORS:
        try:
            importlib.import_module(_LAZY_MODULES[name])
        except Exception as e:  # an optional dependency is missing or broken
            _IMPORT_ERRORS[name] = f"{type(e).__name__}: {e}"
            log.debug("kernel %s unavailable: %s", name, _IMPORT_ERRORS[name])
    if name in _KERNELS:
        return _KERNELS[name]
    if name in _IMPORT_ERRORS:
        raise RuntimeError(f"quantvla kernel {name!r} cannot be loaded: {_IMPORT_ERRORS[name]}")
    raise KeyError(f"unknown quantvla kernel {name!r}; known kernels: {sorted(set(_KERNELS) | set(_LAZY_MODULES))}")


def kernel_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if kernel ``name`` can run on ``device``, else a sentence saying why not."""
    try:
        k = get_kernel(name)
    except (RuntimeError, KeyError) as e:
        return str(e)
    return k.unavailable_reason(torch.device(device))


def available_kernels(device: torch.device) -> list[str]:
    return [n for n in _LAZY_MODULES if kernel_unavailable_reason(n, device) is None]


def m_bucket(m: int) -> int:
    """Token counts are grouped in powers of two for per-shape selection."""
    return 1 << max(0, (max(m, 1) - 1).bit_length())


def resolve_kernel(choice: str, device: torch.device, n: int, k: int, m: int, group_size: int = -1) -> W4A8Kernel:
    """The kernel that runs a W4A8 GEMM of this shape ("auto" measures, see kernels/auto.py)."""
    device = torch.device(device)
    key = (choice, device.type, device.index, n, k, m_bucket(m), group_size)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    if choice == "auto":
        if device.type == "cpu":
            kern = get_kernel("reference")
        else:
            from .auto import select_kernel  # GPU-only: measures candidates once per shape

            kern = select_kernel(device, n, k, m_bucket(m), group_size)
    else:
        kern = get_kernel(choice)
        reason = kern.unavailable_reason(device) or kern.unsupported_reason(n, k, group_size, device)
        if reason:
            raise RuntimeError(f"quantvla kernel {choice!r} cannot run N={n}, K={k} on {device}: {reason}")
    _RESOLVED[key] = kern
    return kern
