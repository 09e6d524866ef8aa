"""``dequant`` W4A16 kernel (an ``auto`` candidate on GPUs): the int4 weight dequantized to the
activation dtype each call, then the vendor GEMM (cuBLAS).  What the seeds' W4FP16 layer did; at
many tokens the GEMM dominates and this can beat a fused int4 kernel.  The weight is rounded once
to bf16/fp16 (2^-9 relative), far below the int4 step; verified like every kernel (verify.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import dequantized


class DequantW4A16Kernel:
    name = "dequant"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None if torch.device(device).type == "cuda" else "the dequant kernel is a GPU fallback (CPU runs reference)"

    def unsupported_reason(self, n: int, k: int, group_size: int, device: torch.device) -> Optional[str]:
        return None

    def linear(self, x, w_packed, w_scale, bias, out_dtype) -> torch.Tensor:
        dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        out = F.linear(x.to(dt), dequantized(w_packed, w_scale, dt), None if bias is None else bias.to(dt))
        return out.to(out_dtype)


KERNEL = DequantW4A16Kernel()


def kernel_for(settings) -> DequantW4A16Kernel:
    return KERNEL
