"""The one canonical int4 weight format every kernel reads.

Signed int4 values in [-8, 7], stored offset-binary (``w + 8``), two per byte, even k in the low
nibble, as an int8 tensor of shape [N, K/2].  This is BitBLAS's plain (``propagate_b=False``)
layout; TileLang-style two's-complement nibbles differ by a per-byte XOR 0x88.
"""
from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(w_int: torch.Tensor) -> torch.Tensor:
    """[N, K] integer tensor with values in [-8, 7] -> [N, K/2] int8 (offset-binary nibbles)."""
    if w_int.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D [N, K] tensor, got shape {tuple(w_int.shape)}")
    if w_int.shape[1] % 2:
        raise ValueError(f"pack_int4 needs an even K, got K={w_int.shape[1]}")
    if w_int.is_floating_point():
        raise TypeError(f"pack_int4 expects integer values, got {w_int.dtype}")
    if w_int.numel() and (int(w_int.min()) < INT4_MIN or int(w_int.max()) > INT4_MAX):
        raise ValueError("pack_int4: values outside [-8, 7] would wrap silently")
    u = (w_int.to(torch.int16) + 8).to(torch.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed.view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] int8 (offset-binary nibbles) -> [N, K] int8 values in [-8, 7]."""
    p = packed.view(torch.uint8)
    low = (p & 0xF).to(torch.int8) - 8
    high = (p >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def to_twos_complement_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Offset-binary packing -> two's-complement nibble packing (TileLang convention)."""
    return (packed.view(torch.uint8) ^ 0x88).view(torch.int8)
