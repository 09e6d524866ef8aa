"""WeightRecipe: the pure function live weight -> packed int4 weight and scales (a derived input).

It lives outside the passes because the same recipe runs at compile time (quantize_weights) and
whenever a weight changes (derived_inputs.PackCache); its key names it in that cache.
"""
from __future__ import annotations

import warnings

import torch

from .duquant.packs import weight_digest
from .duquant.transform import rotate_weight_rows, tensor_fingerprint
from .quant.weights import pack_weight
from .report import QuantVLAWarning


class WeightRecipe:
    """Pure function live weight -> (packed int4, scales); its key identifies it in the cache."""

    def __init__(self, group_size: int, clip: float, transform=None, out_rot=None, row_div=None, rounding=None,
                 fqn: str = "?"):
        self.group_size, self.clip, self.transform, self.out_rot = group_size, clip, transform, out_rot
        self.row_div, self.rounding, self.fqn = row_div, rounding, fqn
        self.key = ("w4a8-int4", group_size, float(clip),
                    transform.fingerprint() if transform is not None else None,
                    tensor_fingerprint(out_rot), tensor_fingerprint(row_div),
                    rounding.fingerprint() if rounding is not None else None)

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
        stored = self._stored(w)
        if stored is not None:
            return stored
        pw = pack_weight(self.transformed(w), self.group_size, self.clip)
        return pw.packed, pw.scale

    def _stored(self, w: torch.Tensor):
        """The pack's stored int4 values (GPTQ) if they were computed from this very weight, else None.

        Row divisors (a later group's smoothing folded into this linear's output rows) scale whole
        rows, which per-row/per-group scales absorb exactly: the integers stay, the scales divide.
        """
        r = self.rounding
        if r is None:
            return None
        why = None
        if r.group_size != self.group_size:
            why = f"the pack's int4 values are for group_size {r.group_size}, this compile uses {self.group_size}"
        elif self.out_rot is not None:
            why = "stored int4 values cannot take an output rotation"
        elif weight_digest(w) != r.weight_digest:
            why = "weights changed since calibration: re-calibrate"
        if why is not None:
            warnings.warn(f"{self.fqn}: {r.method} rounding not used ({why}); rounding to nearest instead",
                          QuantVLAWarning, stacklevel=2)
            return None
        scale = r.scale.to(w.device)
        if self.row_div is not None:
            d = self.row_div.to(device=w.device, dtype=torch.float32)
            scale = scale / (d if scale.dim() == 1 else d[:, None])
        return r.packed.to(w.device), scale.contiguous()
