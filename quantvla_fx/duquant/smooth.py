"""SmoothQuant-style per-input-channel smoothing factors, as DuQuant computes them.

s_j = clamp(act_max_j^α / w_max_j^(1-α), min=1e-5), with act_max and w_max each clamped to >= 1e-5
first (DuQuant's CLIPMIN), then floored at 1e-2: DuQuant's ``smooth_and_let_inplace`` passes every
scale through ``truncate_number(threshold=1e-2)`` before folding, so 1e-2 is the effective floor.
The activation is divided by s and the weight columns multiplied by it.

α defaults to 0.6 (DuQuant's ``run.sh``; ``run_lwc.sh`` and ``main.py`` use 0.5).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

DEFAULT_ALPHA = 0.6
CLIPMIN = 1e-5  # DuQuant quantize/const.py
SMOOTH_FLOOR = 1e-2  # DuQuant truncate_number threshold applied before folding


def weight_column_max(weights: Sequence[Tensor]) -> Tensor:
    """max_n |W_nj| over the rows of all given [N_i, K] weights (a group's concatenated weights).

    DuQuant takes w_max from one representative per group (q_proj for q/k/v, up_proj for
    gate/up).  We use every member: each member's columns are multiplied by the same s, so the
    column max over the union bounds the growth of the worst member, and no name heuristics are
    needed to pick a representative.
    """
    if not weights:
        raise ValueError("weight_column_max needs at least one weight")
    cols = [w.detach().abs().amax(dim=0).to(torch.float64) for w in weights]
    return torch.stack(cols).amax(dim=0)


def smooth_scales(act_max: Tensor, w_max: Tensor, alpha: float = DEFAULT_ALPHA,
                  floor: float = SMOOTH_FLOOR) -> Tensor:
    """Per-channel smoothing factors s [K] (fp32), computed in fp64."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_max.shape != w_max.shape or act_max.dim() != 1:
        raise ValueError(f"act_max {tuple(act_max.shape)} and w_max {tuple(w_max.shape)} must be equal 1-D shapes")
    a = act_max.detach().to(torch.float64).clamp(min=CLIPMIN)
    w = w_max.detach().to(torch.float64).to(a.device).clamp(min=CLIPMIN)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=CLIPMIN)
    return s.clamp(min=floor).to(torch.float32)
