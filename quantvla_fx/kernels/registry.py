"""Kernel registry: the W4A8 kernel objects by name, loaded on first use.

A kernel is an object with ``name``, ``unavailable_reason(device)``, ``unsupported_reason(n, k,
group_size, device)``, ``mm(x_q, w_packed) -> int32`` and ``linear(x_q, x_scale, w_packed,
w_scale, bias, out_dtype)``.  Each kernel module exposes ``kernel_for(settings)``; the registry
imports it by name only when that kernel is asked for, so a CPU-only install never touches CUDA
libraries, and no kernel module imports the registry (no cycle).  Tests build their own
``KernelRegistry`` and register fakes on it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Mapping, Optional, Protocol

import torch

from ..kernel_support import DEFAULT_SETTINGS, KernelSettings

log = logging.getLogger("quantvla_fx")

MODULES = {
    "reference": "quantvla_fx.kernels.reference",
    "triton": "quantvla_fx.kernels.triton.kernel",
    "bitblas": "quantvla_fx.kernels.bitblas.kernel",
}


class W4A8Kernel(Protocol):
    name: str

    def unavailable_reason(self, device: torch.device) -> Optional[str]: ...

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]: ...

    def mm(self, x_q: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor: ...

    def linear(self, x_q, x_scale, w_packed, w_scale, bias, out_dtype) -> torch.Tensor: ...


class KernelRegistry:
    """Kernels by name: registered objects first, then the modules in ``modules`` (imported lazily)."""

    def __init__(self, modules: Mapping[str, str] = MODULES):
        self._modules = dict(modules)
        self._kernels: dict[str, W4A8Kernel] = {}
        self._import_errors: dict[str, str] = {}

    def register(self, kernel: W4A8Kernel) -> W4A8Kernel:
        """Use ``kernel`` for its name (whatever the settings), e.g. a fake in a test."""
        self._kernels[kernel.name] = kernel
        return kernel

    def get(self, name: str, settings: KernelSettings = DEFAULT_SETTINGS) -> W4A8Kernel:
        """The kernel called ``name`` for these settings; raises with the reason when it cannot load."""
        if name in self._kernels:
            return self._kernels[name]
        if name not in self._modules:
            raise KeyError(f"unknown quantvla kernel {name!r}; known kernels: {sorted(set(self._kernels) | set(self._modules))}")
        if name not in self._import_errors:
            try:
                return importlib.import_module(self._modules[name]).kernel_for(settings)
            except Exception as e:  # an optional dependency is missing or broken
                self._import_errors[name] = f"{type(e).__name__}: {e}"
                log.debug("kernel %s unavailable: %s", name, self._import_errors[name])
        raise RuntimeError(f"quantvla kernel {name!r} cannot be loaded: {self._import_errors[name]}")

    def unavailable_reason(self, name: str, device, settings: KernelSettings = DEFAULT_SETTINGS) -> Optional[str]:
        """None if kernel ``name`` loads and can run on ``device``, else a sentence saying why not."""
        try:
            kern = self.get(name, settings)
        except (RuntimeError, KeyError) as e:
            return str(e)
        return kern.unavailable_reason(torch.device(device))


REGISTRY = KernelRegistry()


def get_kernel(name: str, settings: KernelSettings = DEFAULT_SETTINGS) -> W4A8Kernel:
    return REGISTRY.get(name, settings)


def kernel_unavailable_reason(name: str, device) -> Optional[str]:
    return REGISTRY.unavailable_reason(name, device)
