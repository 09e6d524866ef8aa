"""Launching the Triton W4A16 kernel with one tile configuration (no tuning here).

Torch allocations plus one launch (split-K included), no host syncs: CUDA-graph capturable.  The
split-K arrival counters are the W4A8 kernel's (kernels/triton/launch.py): both kernels leave them
at zero, and launches on one stream never overlap.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import triton

from ..triton.launch import _counters
from .triton_jit import w4a16_kernel

# triton.jit reads TRITON_INTERPRET when the kernel is decorated; its bf16 arithmetic is not exact.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class W4A16Tile:
    """BLOCK_N weight rows (the MMA's M side) × BLOCK_M tokens, BLOCK_KH packed bytes (K/2) per step."""

    block_n: int
    block_m: int
    block_kh: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    interleave: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "W4A16Tile":
        return W4A16Tile(**{k: d[k] for k in W4A16Tile.__dataclass_fields__ if k in d})

    def key(self) -> str:
        return (f"n{self.block_n}_m{self.block_m}_kh{self.block_kh}_s{self.split_k}_w{self.num_warps}"
                f"_st{self.num_stages}{'_il' if self.interleave else ''}")


def fit_block_kh(block_kh: int, kh: int, group_size: int) -> int:
    """The K step a tile can use here: no wider than K needs, dividing the group (16 bytes minimum)."""
    b = max(16, min(block_kh, triton.next_power_of_2(kh)))
    if group_size > 0:
        while b > 16 and (group_size // 2) % b:
            b //= 2
    return b


def _prepare_x(x: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along K, even row stride and a 4-byte aligned start (read as int32)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) % 2) or x.data_ptr() % 4:
        x = x.contiguous()
    if x.data_ptr() % 4:
        x = x.clone()
    return x


def launch(x, w_packed, w_scale, bias, out_dtype, cfg: W4A16Tile) -> torch.Tensor:
    """x [M, K] (bf16/fp16) · (unpack(w_packed) · w_scale)ᵀ (+ bias) -> out_dtype [M, N]."""
    m, k = x.shape
    n, kh = w_packed.shape
    dev = x.device
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=dev)
    group_size = -1 if w_scale.dim() == 1 or w_scale.shape[1] == 1 else k // w_scale.shape[1]
    bkh = fit_block_kh(cfg.block_kh, kh, group_size)
    x = _prepare_x(x)
    w = w_packed if w_packed.stride(-1) == 1 else w_packed.contiguous()
    ws = w_scale.float().reshape(n, -1).contiguous()
    split = max(1, min(cfg.split_k, triton.cdiv(kh, bkh)))
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    out = torch.empty(m, n, dtype=out_dtype, device=dev)
    b = bias.contiguous() if bias is not None else ws
    if split > 1:
        part = torch.empty(split * m * n, dtype=torch.float32, device=dev)
        cnt = _counters(dev, tiles)
    else:
        part, cnt = out, out
    w4a16_kernel[(tiles, split)](
        x, w, ws, b, out, part, cnt,
        m, n, kh,
        x.stride(0), w.stride(0), ws.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n,
        BLOCK_M=cfg.block_m,
        BLOCK_KH=bkh,
        SPLIT_K=split,
        GROUP_KH=0 if group_size == -1 else group_size // 2,
        EVEN_K=kh % (split * bkh) == 0,
        HAS_BIAS=bias is not None,
        X_FP16=x.dtype == torch.float16,
        FAST_DECODE=not INTERPRET,
        INTERLEAVE=cfg.interleave,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
