"""``quantvla::w4a16_linear``: activations in their own float dtype × packed int4 weights (weight-only).

x [..., K] (bf16 / fp16 / fp32), w_packed int8 [N, K/2] in the canonical format
(quant/int4_pack.py), w_scale fp32 [N] (per channel) or [N, K/g] (per group), optional bias;
returns ``x · (unpack(w_packed) · w_scale)ᵀ + bias`` in ``out_dtype``.  No activation quantization.
The kernel is chosen at call time by kernels/w4a16/select.py from (device, N, K, M, group, dtype).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.w4a16 import select

_TAGS = (torch.Tag.flexible_layout,)
_OP = "quantvla::w4a16_linear"


def _check(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor) -> tuple[int, int]:
    torch._check(x.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64),
                 lambda: f"{_OP}: x must be a float tensor, got {x.dtype}")
    torch._check(w_packed.dtype in (torch.int8, torch.uint8) and w_packed.dim() == 2,
                 lambda: f"{_OP}: w_packed must be int8 [N, K/2], got {w_packed.dtype} {tuple(w_packed.shape)}")
    n, k = w_packed.shape[0], x.shape[-1]
    torch._check(k == 2 * w_packed.shape[1],
                 lambda: f"{_OP}: x has K={k} but w_packed holds K={2 * w_packed.shape[1]} (shape {tuple(w_packed.shape)})")
    torch._check(w_scale.dim() in (1, 2) and w_scale.shape[0] == n,
                 lambda: f"{_OP}: w_scale must be [N] or [N, K/group] with N={n}, got {tuple(w_scale.shape)}")
    if w_scale.dim() == 2:
        torch._check(k % w_scale.shape[1] == 0,
                     lambda: f"{_OP}: w_scale has {w_scale.shape[1]} groups, which do not divide K={k}")
    return n, k


def _group_size(w_scale: torch.Tensor, k: int) -> int:
    return -1 if w_scale.dim() == 1 or w_scale.shape[1] == 1 else k // w_scale.shape[1]


@torch.library.custom_op(_OP, mutates_args=(), tags=_TAGS)
def w4a16_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    kernel: str = "auto",
) -> torch.Tensor:
    n, k = _check(x, w_packed, w_scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    kern = select.resolve_kernel(kernel, x.device, n, k, x2.shape[0], _group_size(w_scale, k), x.dtype)
    return kern.linear(x2, w_packed.view(torch.int8), w_scale, bias, out_dtype).reshape(*lead, n)


@w4a16_linear.register_fake
def _w4a16_linear_fake(x, w_packed, w_scale, bias, out_dtype, kernel="auto"):
    n, _ = _check(x, w_packed, w_scale)
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype)
