"""Reference W4A8 kernel for every device: exact integer math through float matmuls.

Integer products are computed as fp32 matmuls on the integer values.  Every partial sum is an
integer bounded by K·127·8, which fp32 holds exactly while it stays below 2**24; longer K is split
into chunks whose exact results are added in int32.  On GPUs fp32 matmuls may run as TF32, so there
the reference computes in fp64 instead.  (``torch._int_mm`` on CPU is 13-28x slower than this.)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..quant.int4_pack import unpack_int4

# Largest K whose fp32 sum of int8×int4 products is exact: K·128·8 <= 2**24.
FP32_EXACT_K = 16384


def _matmul_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float64


def _integer_matmul(x_q: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] int8 × w_int [N, K] int8 -> exact [M, N] in the matmul dtype (integral values)."""
    dt = _matmul_dtype(x_q.device)
    k = x_q.shape[-1]
    if dt == torch.float64 or k <= FP32_EXACT_K:
        return x_q.to(dt) @ w_int.to(dt).t()
    acc = torch.zeros(x_q.shape[0], w_int.shape[0], dtype=torch.int32, device=x_q.device)
    for k0 in range(0, k, FP32_EXACT_K):
        part = x_q[:, k0 : k0 + FP32_EXACT_K].to(dt) @ w_int[:, k0 : k0 + FP32_EXACT_K].to(dt).t()
        acc += part.to(torch.int32)
    return acc


class ReferenceKernel:
    name = "reference"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        return None

    def mm(self, x_q: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
        return _integer_matmul(x_q, unpack_int4(w_packed)).to(torch.int32)

    def linear(self, x_q, x_scale, w_packed, w_scale, bias, out_dtype) -> torch.Tensor:
        w_int = unpack_int4(w_packed)
        if w_scale.dim() == 1:
            acc = _integer_matmul(x_q, w_int).to(torch.float32)
            out = acc * x_scale.float() * w_scale.float()
        else:
            # Per-group scales: exact integer sums per group, then scaled and summed in fp32.
            m, k = x_q.shape
            n, groups = w_scale.shape
            g = k // groups
            dt = _matmul_dtype(x_q.device)
            xg = x_q.to(dt).view(m, groups, g).transpose(0, 1)  # [G, M, g]
            wg = w_int.to(dt).view(n, groups, g).permute(1, 2, 0)  # [G, g, N]
            acc = torch.bmm(xg, wg).float()  # [G, M, N], exact integers
            out = (acc * w_scale.float().t()[:, None, :]).sum(0) * x_scale.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)


KERNEL = ReferenceKernel()


def kernel_for(settings) -> ReferenceKernel:
    """The reference has no settings: one instance serves every compile."""
    return KERNEL
