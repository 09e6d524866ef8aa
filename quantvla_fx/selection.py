"""Whether a selected weight can be quantized, from its shape and dtype alone.

One rule set for the backend's ``match_linears`` analysis and for ``quantvla-fx inspect`` (which
reads a checkpoint without compiling), so the two never disagree.
"""
from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def weight_rule_violation(shape: tuple[int, ...], dtype: torch.dtype, group_size: int, quantize: bool = True) -> Optional[str]:
    """None if a [N, K] weight of this dtype can become packed int4, else a sentence saying why not."""
    if len(shape) != 2:
        return f"weight has shape {tuple(shape)}, expected 2-D [N, K]"
    if not quantize:
        return None
    k = shape[1]
    if dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {dtype} is not supported by the W4A8 kernels (float32, bfloat16, float16)"
    if k % 2:
        return f"in_features K={k} is odd: int4 packing stores two values per byte"
    if group_size > 0 and k % group_size:
        return f"in_features K={k} is not a multiple of group_size={group_size}"
    return None


def packed_bytes(n: int, k: int, group_size: int) -> int:
    """Bytes of a packed int4 weight and its fp32 scales (one per output channel or per group)."""
    groups = 1 if group_size <= 0 else k // group_size
    return n * k // 2 + 4 * n * groups
