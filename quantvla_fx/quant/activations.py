"""Per-token symmetric int8 activation quantization, written as plain aten ops.

These functions are traced into the FX graph by the substitute pass, so Inductor can fuse them into
the kernel of the op before (RMSNorm, GeGLU, residual add).  Values lie in [-127, 127] (scale =
absmax/127, floored so an all-zero row gives zeros, not NaN).  A row holding NaN or ±Inf gets a
NaN scale, so every output of that token is NaN: float would give ±Inf or NaN there, and an int8
code of an infinite value would otherwise come out finite or with the wrong sign.
"""
from __future__ import annotations

import torch

ACT_QMAX = 127
# Floor of the per-token scale: an all-zero token quantizes to zeros instead of dividing by zero.
ACT_SCALE_EPS = 1e-10


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (any float dtype) -> (int8 [..., K], fp32 scale [..., 1], detached)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax / ACT_QMAX, min=ACT_SCALE_EPS)
    scale = torch.where(torch.isinf(scale), torch.nan, scale)  # an Inf row: NaN out, never a wrong sign
    q = torch.clamp(torch.round(xf / scale), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    # The custom op has no autograd formula: nothing differentiable may feed it.
    return q, scale.detach()


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
