"""DuQuant's zigzag permutation: spread the largest channels evenly over the blocks.

Channels are sorted by their max |x| (descending, ties by index) and dealt to the nb = K/B blocks
in the order 0, 1, ..., nb-1, nb-1, ..., 1, 0, 0, 1, ... (each end block takes two in a row), then
each block keeps its channels in descending order.  ``perm`` is the concatenation of the blocks;
applying it is ``x.index_select(-1, perm)``.  Equivalent to ``permutation_zigzag`` in DuQuant's
quantize/quantizer.py, vectorized.
"""
from __future__ import annotations

import torch
from torch import Tensor


def zigzag_permutation(channel_max: Tensor, block_size: int) -> Tensor:
    """channel_max [K] -> perm int64 [K]; K must be a multiple of block_size."""
    k = channel_max.shape[-1]
    if channel_max.dim() != 1 or k % block_size:
        raise ValueError(f"channel_max must be 1-D with length a multiple of {block_size}, got {tuple(channel_max.shape)}")
    nb = k // block_size
    order = torch.sort(channel_max.detach().cpu().to(torch.float64), descending=True, stable=True).indices
    pos = torch.arange(k) % (2 * nb)
    block_of = torch.where(pos < nb, pos, 2 * nb - 1 - pos)
    # Stable sort by block keeps, inside each block, the arrival order, which is descending.
    return order[torch.sort(block_of, stable=True).indices].to(torch.int64)


def block_maxima(channel_max: Tensor, block_size: int) -> Tensor:
    """Per-block max of a [K] channel-max vector (what the zigzag balances)."""
    return channel_max.reshape(-1, block_size).amax(dim=-1)
