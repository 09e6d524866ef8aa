"""Rotary position embedding, half-split (``rotate_half``) convention, as HF Gemma computes it."""
from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, L) int positions -> cos, sin of shape (B, L, head_dim) in ``dtype``.

    Angles are float32 products position * inv_freq (HF's outer-product matmul has K=1, so a
    plain multiply gives the same bits); the cast to the activation dtype happens last, as in HF.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, L, head_dim); cos/sin: (B, L, head_dim)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
