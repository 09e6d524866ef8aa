"""What each W4A8 kernel can run, from shape and device rules alone (no kernel is imported or built).

The passes and the backend ask here, so that compiling never builds, verifies or times a kernel:
that happens behind the custom op, at its first call (``quantvla_fx.kernels.select``).  The
kernels apply the same rules (they import them from here) and add what only they can know:
whether triton/bitblas actually import, whether an operator builds and is exact.

The op carries the kernel choice as a string made by :func:`kernel_arg`: the kernel name, plus
this compile's kernel settings when they differ from the defaults (``"auto|enable_tuning=1"``),
so that two compiles with different settings never share process-wide state.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Optional

import torch

KERNELS = ("auto", "reference", "bitblas", "triton")
AUTO_REPORT = "chosen per call by auto"


@dataclass(frozen=True)
class KernelSettings:
    """Per-compile kernel switches (BitBLAS's, today): what ``QuantVLAConfig`` hands to the op.

    ``opt_m`` are BitBLAS's M buckets, sorted and unique; empty means its default buckets.
    """

    enable_tuning: bool = False
    opt_m: tuple[int, ...] = ()

    def __post_init__(self):
        ms = tuple(sorted({int(m) for m in self.opt_m}))
        if any(m <= 0 for m in ms):
            raise ValueError(f"opt_m={ms}: token counts must be positive")
        object.__setattr__(self, "opt_m", ms)
        object.__setattr__(self, "enable_tuning", bool(self.enable_tuning))

    @classmethod
    def of(cls, config) -> "KernelSettings":
        """The settings of a ``QuantVLAConfig`` (its ``enable_tuning`` and ``opt_m``)."""
        return cls(enable_tuning=config.enable_tuning, opt_m=config.opt_m)


DEFAULT_SETTINGS = KernelSettings()


def kernel_arg(config) -> str:
    """The op's ``kernel`` argument for this config: the name, and the settings that apply to it."""
    if config.kernel not in ("auto", "bitblas"):
        return config.kernel
    settings = KernelSettings.of(config)
    parts = [config.kernel]
    if settings.enable_tuning:
        parts.append("enable_tuning=1")
    if settings.opt_m:
        parts.append("opt_m=" + ",".join(str(m) for m in settings.opt_m))
    return "|".join(parts)


@lru_cache(maxsize=None)  # a pure function of the string: parsed once, not on every op call
def parse_kernel_arg(arg: str) -> tuple[str, KernelSettings]:
    """(kernel name, settings) from :func:`kernel_arg`'s string; a plain name has the defaults."""
    name, *items = arg.split("|")
    kw: dict = {}
    known = {f.name for f in fields(KernelSettings)}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known:
            raise ValueError(f"kernel argument {arg!r}: unknown setting {key!r}")
        kw[key] = value == "1" if key == "enable_tuning" else tuple(int(v) for v in value.split(",") if v)
    return name, KernelSettings(**kw)


def m_bucket(m: int) -> int:
    """Token counts are grouped in powers of two for per-shape choices (auto, Triton tiles)."""
    return 1 << max(0, (max(m, 1) - 1).bit_length())


def report_name(arg: str, device: torch.device) -> str:
    """What the report's kernel column says before any call: the forced name, or auto's rule."""
    name, _ = parse_kernel_arg(arg)
    if name != "auto":
        return name
    return "reference" if torch.device(device).type == "cpu" else AUTO_REPORT


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (looked up, not imported)."""
    return importlib.util.find_spec(package) is not None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _triton_device_reason(device: torch.device) -> Optional[str]:
    if not installed("triton"):
        return "triton is not installed (pip install quantvla-fx[gpu])"
    if device.type != "cuda":
        return f"the triton W4A8 kernel needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "the triton W4A8 kernel needs a CUDA device, and torch.cuda is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"the triton W4A8 kernel needs int8 tensor cores (compute capability 8.0+), this GPU is {cap[0]}.{cap[1]}"
    return None


def _bitblas_device_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the bitblas kernel needs a CUDA device, got {device}."
    if not installed("bitblas"):
        return "bitblas is not installed (pip install quantvla-fx[bitblas])."
    if not torch.cuda.is_available():
        return "the bitblas kernel needs a CUDA device, but torch.cuda.is_available() is False."
    idx = _cuda_index(device)
    if idx != 0:
        # BitBLAS 0.1.0.post1 queries and initialises its kernels on CUDA device 0 only.
        return f"bitblas 0.1.0.post1 runs on CUDA device 0 only (got cuda:{idx}); use CUDA_VISIBLE_DEVICES."
    major, minor = torch.cuda.get_device_capability(idx)
    if major < 8:
        return f"the bitblas int8 kernel needs compute capability 8.0 or newer (int8 mma.sync); this GPU is {major}.{minor}."
    return None


_DEVICE_RULES = {"reference": lambda device: None, "triton": _triton_device_reason, "bitblas": _bitblas_device_reason}


def device_reason(name: str, device) -> Optional[str]:
    """None if kernel ``name`` may run on ``device`` (package present, device kind, capability)."""
    if name == "auto":
        return None
    if name not in _DEVICE_RULES:
        return f"unknown quantvla kernel {name!r}; choose one of {KERNELS}"
    return _DEVICE_RULES[name](torch.device(device))


def shape_reason(name: str, n: int, k: int, group_size: int) -> Optional[str]:
    """None if kernel ``name`` computes an [N, K] weight with this group size, else why not."""
    if name == "triton":
        if k % 2:
            return f"K={k} is odd; packed int4 weights need an even K"
        if group_size not in (-1, k):
            return f"per-group weight scales (group_size={group_size}) are not supported by the triton kernel; only per-channel"
    elif name == "bitblas":
        if group_size != -1:
            return (f"group_size={group_size}: the bitblas kernel supports one weight scale per output "
                    "channel only (BitBLAS cannot apply scales to int8 × int4 products in-kernel).")
        if k % 32:
            return f"K={k} is not a multiple of 32, which BitBLAS's int8 tensor-core kernel needs."
        if n % 16:
            return f"N={n} is not a multiple of 16, which BitBLAS's kernel tiles need."
    return None


def cannot_run(name: str, n: int, k: int, group_size: int, device, scheme: str = "w4a8") -> Optional[str]:
    """None if kernel ``name`` may run this GEMM on ``device`` (by the rules above), else why not."""
    if scheme == "w4a16":
        return w4a16_device_reason(name, device) or w4a16_shape_reason(name, n, k, group_size)
    return device_reason(name, device) or shape_reason(name, n, k, group_size)


# -- W4A16 (weight-only int4, quantvla::w4a16_linear; kernels/w4a16/) ------------------------------
def w4a16_device_reason(name: str, device) -> Optional[str]:
    """None if W4A16 kernel ``name`` may run on ``device``."""
    device = torch.device(device)
    if name in ("auto", "reference"):
        return None
    if name == "bitblas":
        return "the bitblas kernel is W4A8 only here (BitBLAS int4 x bf16 is not wired in); use 'triton' or 'auto'"
    if name != "triton":
        return f"unknown quantvla kernel {name!r}; choose one of {KERNELS}"
    if not installed("triton"):
        return "triton is not installed (pip install quantvla-fx[gpu])"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the triton W4A16 kernel needs a CUDA device, got {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"the triton W4A16 kernel needs bf16 tensor cores (compute capability 8.0+), this GPU is {cap[0]}.{cap[1]}"
    return None


def w4a16_shape_reason(name: str, n: int, k: int, group_size: int) -> Optional[str]:
    """None if W4A16 kernel ``name`` computes an [N, K] weight with this group size."""
    if name != "triton":
        return None
    if k % 2:
        return f"K={k} is odd; packed int4 weights need an even K"
    if group_size not in (-1, k) and group_size % 32:
        return f"group_size={group_size}: the triton W4A16 kernel needs -1 (per channel) or a multiple of 32"
    return None
