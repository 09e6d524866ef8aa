"""Round-to-nearest int4 weight quantization, symmetric, per output channel or per group.

Uses torchao's affine quant primitives (SYMMETRIC_NO_CLIPPING_ERR: the scale is chosen so that
neither the positive nor the negative extreme clips, using the full [-8, 7] range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    quantize_affine,
)

from .int4_pack import INT4_MAX, INT4_MIN, pack_int4

# Floor for a weight scale: an all-zero row must not divide by zero.
WEIGHT_SCALE_EPS = 1e-8


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernels' format: packed int4 + fp32 scales ([N] or [N, K/group])."""

    packed: torch.Tensor  # int8 [N, K/2]
    scale: torch.Tensor  # float32 [N] (per channel) or [N, K // group_size]

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


def quantize_weight_int4(
    weight: torch.Tensor, group_size: int = -1, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 values in [-8, 7] of shape [N, K], fp32 scale [N] or [N, K/g]).

    ``clip_ratio`` < 1 shrinks the range before choosing the scale (DuQuant's weight clipping).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = k if group_size in (-1, None) else group_size
    if k % g:
        raise ValueError(f"K={k} is not a multiple of group_size={g}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    w = weight.detach().float()
    ref = w * clip_ratio if clip_ratio != 1.0 else w
    scale, zero = choose_qparams_affine(
        ref, MappingType.SYMMETRIC_NO_CLIPPING_ERR, (1, g), torch.int8,
        INT4_MIN, INT4_MAX, eps=WEIGHT_SCALE_EPS, scale_dtype=torch.float32,
        zero_point_dtype=torch.int32,
    )
    q = quantize_affine(w, (1, g), scale, zero, torch.int8, INT4_MIN, INT4_MAX)
    scale = scale.reshape(n, k // g).float()
    if g == k:
        scale = scale.reshape(n)
    return q, scale.contiguous()


def pack_weight(weight: torch.Tensor, group_size: int = -1, clip_ratio: float = 1.0) -> PackedWeight:
    q, scale = quantize_weight_int4(weight, group_size, clip_ratio)
    return PackedWeight(pack_int4(q).contiguous(), scale)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int values [N, K] + scales ([N] or [N, G]) -> fp32 [N, K] (for references and tests)."""
    n, k = q.shape
    if scale.dim() == 1:
        return q.float() * scale[:, None]
    g = k // scale.shape[1]
    return (q.float().view(n, -1, g) * scale[:, :, None]).view(n, k)
