"""Attention masks as openpi builds them (pad masks + autoregressive block masks)."""
from __future__ import annotations

import torch

# openpi's additive mask value (pi0_pytorch.py). Finite, so a query row whose keys are all
# masked (a padded prefix token) gets a uniform softmax instead of NaN, exactly as in openpi.
MASK_VALUE = -2.3819763e38


def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    """(B, L) pad mask + (B, L) block-start mask -> (B, L, L) bool "query i may see key j".

    A token sees every valid token whose block index (cumsum of ``att_masks``) is <= its own.
    """
    if att_masks.ndim != 2 or pad_masks.ndim != 2:
        raise ValueError(f"pad_masks and att_masks must be (B, L), got {tuple(pad_masks.shape)} and {tuple(att_masks.shape)}")
    cumsum = torch.cumsum(att_masks, dim=1)
    att_2d = cumsum[:, None, :] <= cumsum[:, :, None]
    pad_2d = pad_masks[:, None, :] & pad_masks[:, :, None]
    return att_2d & pad_2d


def additive_mask_4d(allowed: torch.Tensor) -> torch.Tensor:
    """(B, Lq, Lk) bool -> (B, 1, Lq, Lk) float32 additive mask (0 or MASK_VALUE)."""
    return torch.where(allowed[:, None, :, :], 0.0, MASK_VALUE).to(torch.float32)
