"""What "correct" means for a W4A16 kernel: within the output dtype's rounding of an fp64 truth.

The products x·q (a bf16/fp16 value times a 4-bit integer) are exact in fp32; what a kernel may
differ by is its fp32 summation order and one rounding of the output.  Test data: random normal
activations, full-range int4 weights, positive scales (never zeros: they hide unwritten outputs).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...quant.int4_pack import pack_int4
from .reference import dequantized

# Largest allowed |got - want| relative to max |want|, per output dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5}
LOW_PRECISION_TOLERANCE = 2**-7  # bf16 / fp16 outputs: one rounding of the output


def random_problem(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device, seed: Optional[int] = None):
    """(x [m, k] in dtype, packed int4 [n, k/2], fp32 scales [n] or [n, k/group]), seeded by the shape."""
    g = torch.Generator(device=device).manual_seed(977 + m + 7919 * n + 31 * k if seed is None else seed)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device, generator=g)
    groups = 1 if group_size == -1 else k // group_size
    s = torch.rand(n, groups, device=device, generator=g) * 1e-2 + 1e-3
    return x, pack_int4(w), (s[:, 0] if group_size == -1 else s).contiguous()


def truth(x, w_packed, w_scale, bias=None) -> torch.Tensor:
    """fp64 result of the op's definition."""
    out = x.double() @ dequantized(w_packed, w_scale, torch.float64).t()
    return out if bias is None else out + bias.double()


def linear_error(linear: Callable, x, w_packed, w_scale, bias, out_dtype: torch.dtype, want=None) -> Optional[str]:
    """None if ``linear(x, w_packed, w_scale, bias, out_dtype)`` is finite and within tolerance."""
    got = linear(x, w_packed, w_scale, bias, out_dtype)
    want = truth(x, w_packed, w_scale, bias) if want is None else want
    m = x.shape[0]
    if got.shape != want.shape or got.dtype != out_dtype:
        return f"returned {tuple(got.shape)} {got.dtype} for M={m}, expected {tuple(want.shape)} {out_dtype}"
    if not torch.isfinite(got).all():
        return f"returned non-finite values at M={m}"
    tol = TOLERANCE.get(out_dtype, LOW_PRECISION_TOLERANCE) * float(want.abs().max())
    bad = int(((got.double() - want).abs() > tol).sum())
    if bad:
        return f"differs from the fp64 truth at M={m}: {bad} of {got.numel()} outputs beyond {tol:.3g}"
    return None


def check_kernel(kern, n: int, k: int, m: int, group_size: int, device, dtype: torch.dtype = torch.bfloat16) -> Optional[str]:
    """None if ``kern`` is right for this shape at M = ``m`` (bf16 in and out, with a bias)."""
    try:
        x, w, s = random_problem(m, n, k, group_size, dtype, device)
        bias = torch.randn(n, device=device).to(dtype)
        return linear_error(kern.linear, x, w, s, bias, dtype)
    except Exception as e:  # a kernel that raises is as unusable as a wrong one
        return f"{type(e).__name__}: {str(e)[-300:]}"
