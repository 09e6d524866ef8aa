"""Reference W4A16 kernel for every device: dequantize the int4 weight, fp32 matmul.

It defines the op's result: ``(x · (q · s)ᵀ + bias)`` computed in fp32 (fp64 inputs in fp64) and
rounded once to the output dtype.  On a GPU its fp32 matmul follows the process's TF32 setting, like
any fp32 matmul of the model; kernels are verified against an fp64 truth (verify.py), not this.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...quant.int4_pack import unpack_int4
from ...quant.weights import dequantize_weight


def dequantized(w_packed: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the op multiplies by: unpack(w_packed) · w_scale, [N, K] in ``dtype``."""
    return dequantize_weight(unpack_int4(w_packed.view(torch.int8)), w_scale.float()).to(dtype)


class ReferenceW4A16Kernel:
    name = "reference"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        return None

    def linear(self, x, w_packed, w_scale, bias, out_dtype) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = F.linear(x.to(dt), dequantized(w_packed, w_scale, dt), None if bias is None else bias.to(dt))
        return out.to(out_dtype)


KERNEL = ReferenceW4A16Kernel()


def kernel_for(settings) -> ReferenceW4A16Kernel:
    return KERNEL
