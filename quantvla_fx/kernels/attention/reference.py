"""The definition of ``quantvla::attention``: SDPA's math in fp32 with openpi's finite additive mask.

What the original graphs computed: K/V repeated per query head (head h reads KV head
h // (Hq/Hkv), HF's repeat_kv), logits + an additive mask of 0 / MASK_VALUE, softmax, so a query row
that sees no key gets a uniform softmax over all keys.  Written out (SDPA's math backend) rather
than calling F.scaled_dot_product_attention, whose fused CUDA backends return 0 for such rows.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...attention_support import MASK_VALUE


def additive_mask(key_valid: Optional[torch.Tensor], query_valid: Optional[torch.Tensor], b: int, lq: int,
                  lk: int, device) -> Optional[torch.Tensor]:
    """(B, 1, Lq, Lk) float32 additive mask (0 where visible, MASK_VALUE elsewhere), None if all visible."""
    if key_valid is None and query_valid is None:
        return None
    allowed = torch.ones(b, lq, lk, dtype=torch.bool, device=device)
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    if query_valid is not None:
        allowed = allowed & query_valid.bool()[:, :, None]
    return torch.where(allowed[:, None], 0.0, MASK_VALUE).to(torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
              query_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    b, hq, lq, _ = q.shape
    groups = hq // k.shape[1]
    kf, vf = k.float(), v.float()
    if groups > 1:
        kf, vf = kf.repeat_interleave(groups, dim=1), vf.repeat_interleave(groups, dim=1)
    mask = additive_mask(key_valid, query_valid, b, lq, k.shape[2], q.device)
    logits = (q.float() * scale) @ kf.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask
    out = torch.softmax(logits, dim=-1) @ vf
    return out.to(q.dtype).contiguous()  # the fake promises a contiguous (B, Hq, Lq, D)
