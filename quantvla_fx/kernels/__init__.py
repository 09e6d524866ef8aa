"""W4A8 GEMM kernels behind the quantvla custom ops.

Each kernel lives in its own module and registers itself with :mod:`.registry`.  Passes never
import kernels; the ops ask the registry which kernel runs for a (device, N, K, M) at call time.
"""
from .registry import KERNEL_CHOICES, W4A8Kernel, available_kernels, get_kernel, register_kernel, resolve_kernel

__all__ = [
    "KERNEL_CHOICES",
    "W4A8Kernel",
    "available_kernels",
    "get_kernel",
    "register_kernel",
    "resolve_kernel",
]
