"""One derived input for a group of linears that read one activation (q/k/v, gate/up).

The members' own recipes (WeightRecipe) run unchanged and their outputs are stacked along the
output rows, so one GEMM computes every member: the packed int4 rows and their scales (or, with
``quantize=False``, the transformed float weights), and the biases that go into that GEMM's
epilogue.  Like every recipe these are pure functions of the live weights; their keys are the
members' keys, so the unrolled calls of one module (Pi0.5's denoise steps) share one pack.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class ConcatRecipe:
    """weights of the members -> (packed [ΣN, K/2], scales [ΣN] or [ΣN, G]), or (float [ΣN, K],)."""

    def __init__(self, recipes: Sequence, float_weights: bool = False):
        self.recipes = tuple(recipes)
        self.float_weights = float_weights
        self.key = ("concat-float" if float_weights else "concat-w4", tuple(r.key for r in self.recipes))

    def __call__(self, *weights: torch.Tensor):
        if len(weights) != len(self.recipes):
            raise ValueError(f"ConcatRecipe: {len(self.recipes)} recipes but {len(weights)} weights")
        if self.float_weights:
            return (torch.cat([r.float_weight(w)[0] for r, w in zip(self.recipes, weights)], 0),)
        parts = [r(w) for r, w in zip(self.recipes, weights)]
        return torch.cat([p[0] for p in parts], 0).contiguous(), torch.cat([p[1] for p in parts], 0).contiguous()


class ConcatBias:
    """The biases in the group's epilogue, stacked; zero rows for members whose bias is added later.

    ``rows``: per member its output-row count; ``present``: which members' biases are sources
    (in order).  A member without one (no bias, a bias restored after an output rotation, or a
    bias computed in the graph) gets zeros: adding them is exact.
    """

    def __init__(self, rows: Sequence[int], present: Sequence[bool]):
        self.rows, self.present = tuple(int(r) for r in rows), tuple(bool(p) for p in present)
        self.key = ("concat-bias", self.rows, self.present)

    def __call__(self, *biases: torch.Tensor):
        it = iter(biases)
        first: Optional[torch.Tensor] = biases[0] if biases else None
        if first is None:
            raise ValueError("ConcatBias: no bias to concatenate")
        parts = [next(it).detach().reshape(-1) if p else first.new_zeros(n) for n, p in zip(self.rows, self.present)]
        return (torch.cat(parts, 0),)
