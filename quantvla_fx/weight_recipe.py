"""WeightRecipe: the pure function live weight -> packed int4 weight and scales (a derived input).

It lives outside the passes because the same recipe runs at compile time (quantize_weights) and
whenever a weight changes (derived_inputs.PackCache); its key names it in that cache.
"""
from __future__ import annotations

import torch

from .duquant.transform import rotate_weight_rows, tensor_fingerprint
from .quant.weights import pack_weight


class WeightRecipe:
    """Pure function live weight -> (packed int4, scales); its key identifies it in the cache."""

    def __init__(self, group_size: int, clip: float, transform=None, out_rot=None, row_div=None):
        self.group_size, self.clip, self.transform, self.out_rot = group_size, clip, transform, out_rot
        self.row_div = row_div
        self.key = ("w4a8-int4", group_size, float(clip),
                    transform.fingerprint() if transform is not None else None,
                    tensor_fingerprint(out_rot), tensor_fingerprint(row_div))

    def _apply(self, w: torch.Tensor) -> torch.Tensor:
        if self.row_div is not None:
            w = w / self.row_div.to(w)[:, None]
        if self.transform is not None:
            w = self.transform.transform_weight(w)
        if self.out_rot is not None:
            w = rotate_weight_rows(w, self.out_rot)
        return w

    def transformed(self, w: torch.Tensor) -> torch.Tensor:
        """The live weight in the transformed basis, fp32 (what gets quantized)."""
        return self._apply(w.detach().to(torch.float32)).float()

    def float_weight(self, w: torch.Tensor):
        """The transformed weight in its own dtype (quantize=False: checks the algebra only)."""
        return (self._apply(w.detach().to(torch.float64)).to(w.dtype),)

    def __call__(self, w: torch.Tensor):
        pw = pack_weight(self.transformed(w), self.group_size, self.clip)
        return pw.packed, pw.scale
