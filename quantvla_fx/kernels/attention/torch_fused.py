"""PyTorch's fused SDPA (flash / cuDNN / efficient) behind ``quantvla::attention``, for calls that
have no padding at all (SigLIP): there PyTorch's kernels are the fastest we measured (H200,
``benchmarks/bench_attention.py``: SigLIP 11.2 µs vs 18.5 µs for our Triton flash kernel).

Only maskless calls: with a mask PyTorch's fused backends return 0 for a query row that sees no
key, where openpi (and the op's definition) gives a uniform softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
              query_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    if key_valid is not None or query_valid is not None:
        raise RuntimeError("quantvla::attention kernel 'torch' runs only calls without padding "
                           "(key_valid and query_valid None); use 'auto', 'splitkv' or 'flash'")
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.contiguous()  # the fake promises a contiguous (B, Hq, Lq, D)
