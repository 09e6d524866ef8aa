"""``quantvla::w4a8_mm`` (exact int32 out) and ``quantvla::w4a8_linear`` (scaled, fused epilogue).

Both take activations already quantized per token (int8 [..., K]) and weights in the canonical
packed int4 format (int8 [N, K/2], see quant/int4_pack.py).  The kernel that runs is chosen at
call time from (device, N, K, M) by kernels/select.py; the graph only carries the compile's choice
string (``kernel_support.kernel_arg``: the kernel name and its settings).

Tagged ``flexible_layout`` so that Inductor lets q/k/v (or gate/up) share one int8 activation
buffer instead of copying it per consumer; the implementations therefore accept any strides.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import select

_TAGS = (torch.Tag.flexible_layout,)


def _check_common(x_q: torch.Tensor, w_packed: torch.Tensor, op: str) -> tuple[int, int]:
    torch._check(x_q.dtype == torch.int8, lambda: f"{op}: x_q must be int8, got {x_q.dtype}")
    torch._check(w_packed.dtype in (torch.int8, torch.uint8), lambda: f"{op}: w_packed must be int8 [N, K/2], got {w_packed.dtype}")
    torch._check(w_packed.dim() == 2, lambda: f"{op}: w_packed must be 2-D [N, K/2], got {w_packed.dim()}-D")
    k = x_q.shape[-1]
    torch._check(
        k == 2 * w_packed.shape[1],
        lambda: f"{op}: x_q has K={k} but w_packed holds K={2 * w_packed.shape[1]} (shape {tuple(w_packed.shape)})",
    )
    return w_packed.shape[0], k


def _group_size(w_scale: torch.Tensor, k: int) -> int:
    return -1 if w_scale.dim() == 1 else k // w_scale.shape[1]


@torch.library.custom_op("quantvla::w4a8_mm", mutates_args=(), tags=_TAGS)
def w4a8_mm(x_q: torch.Tensor, w_packed: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Exact int32 product x_q [..., K] · unpack(w_packed) [N, K]ᵀ -> int32 [..., N]."""
    n, k = _check_common(x_q, w_packed, "quantvla::w4a8_mm")
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, k)
    kern = select.resolve_kernel(kernel, x_q.device, n, k, x2.shape[0])
    return kern.mm(x2, w_packed.view(torch.int8)).reshape(*lead, n)


@w4a8_mm.register_fake
def _w4a8_mm_fake(x_q, w_packed, kernel="auto"):
    n, _ = _check_common(x_q, w_packed, "quantvla::w4a8_mm")
    return x_q.new_empty((*x_q.shape[:-1], n), dtype=torch.int32)


@torch.library.custom_op("quantvla::w4a8_linear", mutates_args=(), tags=_TAGS)
def w4a8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    kernel: str = "auto",
) -> torch.Tensor:
    """(x_q·x_scale) [..., K] · (unpack(w_packed)·w_scale) [N, K]ᵀ + bias -> out_dtype [..., N]."""
    n, k = _check_common(x_q, w_packed, "quantvla::w4a8_linear")
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, k)
    s2 = x_scale.reshape(-1, 1)
    kern = select.resolve_kernel(kernel, x_q.device, n, k, x2.shape[0], _group_size(w_scale, k))
    out = kern.linear(x2, s2, w_packed.view(torch.int8), w_scale, bias, out_dtype)
    return out.reshape(*lead, n)


@w4a8_linear.register_fake
def _w4a8_linear_fake(x_q, x_scale, w_packed, w_scale, bias, out_dtype, kernel="auto"):
    n, k = _check_common(x_q, w_packed, "quantvla::w4a8_linear")
    torch._check(w_scale.shape[0] == n, lambda: f"quantvla::w4a8_linear: w_scale has {w_scale.shape[0]} rows, weight has N={n}")
    torch._check(x_scale.shape[-1] == 1, lambda: "quantvla::w4a8_linear: x_scale must be [..., 1] (per token)")
    return x_q.new_empty((*x_q.shape[:-1], n), dtype=out_dtype)
