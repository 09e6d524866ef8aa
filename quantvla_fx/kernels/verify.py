"""Exact verification against the reference kernel: no kernel, operator or tile is used unchecked.

One place decides what "correct" means: the int32 product must equal the reference's bit for
bit; a scaled (linear) result must be finite and within the output dtype's rounding of the
reference's fp32 epilogue.  Test data is full-range random int8 activations and int4 weights
(never zeros: they hide outputs a kernel forgot to write).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..quant.int4_pack import pack_int4
from .reference import KERNEL as REFERENCE

# Largest allowed |got - want| relative to max |want|, per output dtype of a scaled result.
LINEAR_TOLERANCE = {torch.float32: 1e-4}
LOW_PRECISION_TOLERANCE = 2**-7  # bf16 / fp16 outputs: one rounding of the output


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_problem(m: int, n: int, k: int, device, seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q int8 [m, k], packed int4 weight [n, k/2]), seeded by the shape unless ``seed`` is given."""
    g = _generator(device, 1234 + m + 7919 * n + k if seed is None else seed)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device, generator=g)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device, generator=g)
    return x, pack_int4(w)


def random_scales(m: int, n: int, k: int, group_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_scale [m, 1], w_scale [n] per channel or [n, k / group_size] per group), positive."""
    g = _generator(device, 4321 + m + n + k)
    x_scale = torch.rand(m, 1, device=device, generator=g) * 1e-2 + 1e-3
    groups = 1 if group_size == -1 else k // group_size
    w_scale = torch.rand(n, groups, device=device, generator=g) * 1e-2 + 1e-3
    return x_scale, w_scale[:, 0] if group_size == -1 else w_scale


def mm_error(mm: Callable, x_q: torch.Tensor, w_packed: torch.Tensor, want=None) -> Optional[str]:
    """None if ``mm(x_q, w_packed)`` is the reference's exact int32 product (``want``, when already
    computed), else what differs."""
    got = mm(x_q, w_packed)
    want = REFERENCE.mm(x_q, w_packed) if want is None else want
    m = x_q.shape[0]
    if got.shape != want.shape or got.dtype != torch.int32:
        return f"returned {tuple(got.shape)} {got.dtype} for M={m}, expected {tuple(want.shape)} int32"
    bad = int((got != want).sum())
    if bad:
        return f"wrong results at M={m}: {bad} of {got.numel()} int32 outputs differ from the reference"
    return None


def linear_error(linear: Callable, x_q, x_scale, w_packed, w_scale, out_dtype: torch.dtype, want=None) -> Optional[str]:
    """None if ``linear(...)`` (no bias) is finite and within ``out_dtype``'s rounding of the
    reference's fp32 result (``want``, when already computed)."""
    got = linear(x_q, x_scale, w_packed, w_scale, None, out_dtype)
    if want is None:
        want = REFERENCE.linear(x_q, x_scale, w_packed, w_scale, None, torch.float32)
    m = x_q.shape[0]
    if got.shape != want.shape or got.dtype != out_dtype:
        return f"linear returned {tuple(got.shape)} {got.dtype} for M={m}, expected {tuple(want.shape)} {out_dtype}"
    if not torch.isfinite(got).all():
        return f"linear returned non-finite values at M={m}"
    tol = LINEAR_TOLERANCE.get(out_dtype, LOW_PRECISION_TOLERANCE) * float(want.abs().max())
    bad = int(((got.float() - want).abs() > tol).sum())
    if bad:
        return f"linear differs from the reference at M={m}: {bad} of {got.numel()} outputs beyond {tol:.3g}"
    return None


def check_mm(mm: Callable, n: int, k: int, device, ms: Sequence[int]) -> Optional[str]:
    """:func:`mm_error` on random data for each token count in ``ms``; the first failure."""
    for m in ms:
        why = mm_error(mm, *random_problem(m, n, k, device))
        if why:
            return why
    return None


def check_kernel(kern, n: int, k: int, m: int, group_size: int, device) -> Optional[str]:
    """None if ``kern`` is exact for this shape at M = ``m`` (and its grouped linear, when grouped).

    A kernel that raises is as unusable as a wrong one: the exception becomes the reason.
    """
    try:
        x_q, w = random_problem(m, n, k, device)
        why = mm_error(kern.mm, x_q, w)
        if why is None and group_size != -1:
            x_scale, w_scale = random_scales(m, n, k, group_size, device)
            why = linear_error(kern.linear, x_q, x_scale, w, w_scale, torch.float32)
        return why
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[-300:]}"
