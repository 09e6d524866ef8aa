"""Launching the Triton W4A8 kernel with one tile configuration (no tuning here).

The launch path is torch allocations plus one kernel launch (split-K included): no host syncs,
so it is CUDA-graph capturable.
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import triton

from .jit import w4a8_kernel

# triton.jit reads TRITON_INTERPRET when the kernel is decorated: inline PTX cannot run there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: BLOCK_N weight rows (the MMA's M side), BLOCK_M tokens."""

    block_n: int
    block_m: int
    block_kh: int  # packed bytes along K per step (= BLOCK_K / 2)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    interleave: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TileConfig":
        return TileConfig(**{k: d[k] for k in TileConfig.__dataclass_fields__ if k in d})

    def key(self) -> str:
        return (
            f"n{self.block_n}_m{self.block_m}_kh{self.block_kh}_s{self.split_k}"
            f"_w{self.num_warps}_st{self.num_stages}{'_il' if self.interleave else ''}"
        )


# Split-K arrival counters, one zeroed buffer per (device, stream) that the kernel leaves at zero:
# no zero-fill per launch.  Buffers are never freed, since captured CUDA graphs keep their address.
_COUNTERS: dict[tuple, torch.Tensor] = {}
_KEEP: list[torch.Tensor] = []


def _counters(dev: torch.device, tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    key = (str(dev), stream)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= tiles:
        return buf
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # First use inside a capture: a buffer of the graph's own, zeroed by a memset node per replay.
        return torch.zeros(tiles, dtype=torch.int32, device=dev)
    buf = _zeros_outside_graph_pools(max(tiles, 4096), dev)
    _COUNTERS[key] = buf
    _KEEP.append(buf)
    return buf


def _zeros_outside_graph_pools(n: int, dev: torch.device) -> torch.Tensor:
    """A long-lived zeroed buffer that is not in a CUDA-graph memory pool.

    CUDA-graph trees (``cudagraphs=True`` / ``mode="reduce-overhead"``) route the allocations of
    the warming-up thread (torch >= 2.10: every stream of it; earlier: its current stream) into
    their private pool, and refuse to record when a tensor they do not own stays alive there.  So
    the buffer is allocated by another thread, on a side stream, in the ordinary pool.
    """
    if dev.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=dev)
    made: list = []

    def allocate() -> None:
        try:
            side = torch.cuda.Stream(dev)
            with torch.cuda.stream(side):
                made.append(torch.zeros(n, dtype=torch.int32, device=dev))
            side.synchronize()  # zeroed before any kernel on the caller's stream reads it
        except BaseException as e:  # re-raised in the caller's thread
            made.append(e)

    worker = threading.Thread(target=allocate, name="quantvla-counters")
    worker.start()
    worker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _reg_cap(cfg: TileConfig) -> Optional[int]:
    """A register cap that lets two CTAs share an SM, unless the accumulator alone would spill.

    (The scaled epilogue otherwise pushes 8-warp 128x128 tiles to 144 registers: one CTA per SM
    and a third slower at M=968.)"""
    cap = 65536 // (2 * 32 * cfg.num_warps)
    acc_regs = cfg.block_n * cfg.block_m // (32 * cfg.num_warps)
    return cap if cap < 255 and 2 * acc_regs <= cap else None


def _prepare_x(x_q: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along K; even row stride and address, since x may be read as int16."""
    if x_q.stride(-1) != 1 or (x_q.shape[0] > 1 and x_q.stride(0) % 2):
        x_q = x_q.contiguous()
    if x_q.data_ptr() % 2:
        x_q = x_q.clone()
    return x_q


def launch(
    x_q: torch.Tensor,
    w_packed: torch.Tensor,
    cfg: TileConfig,
    x_scale: Optional[torch.Tensor] = None,
    w_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """int32 x_q·unpack(w)ᵀ when x_scale is None, else the scaled (+bias) product in out_dtype."""
    m, k = x_q.shape
    n, kh = w_packed.shape
    scaled = x_scale is not None
    dev = x_q.device
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype if scaled else torch.int32, device=dev)
    x = _prepare_x(x_q)
    w = w_packed if w_packed.stride(-1) == 1 else w_packed.contiguous()
    split = max(1, min(cfg.split_k, triton.cdiv(kh, cfg.block_kh)))
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    if scaled:
        out = torch.empty(m, n, dtype=out_dtype, device=dev)
        xs = x_scale.reshape(-1).to(torch.float32).contiguous()
        wsc = w_scale.reshape(-1).to(torch.float32).contiguous()
        b = bias.contiguous() if bias is not None else wsc
    else:
        out = torch.empty(m, n, dtype=torch.int32, device=dev)
        xs = wsc = b = out
    if split > 1:
        part = torch.empty(split * m * n, dtype=torch.int32, device=dev)
        cnt = _counters(dev, tiles)
    else:
        part = cnt = out
    opts = {} if INTERPRET else {"maxnreg": _reg_cap(cfg)}
    w4a8_kernel[(tiles, split)](
        x, w, out, part, cnt, xs, wsc, b,
        m, n, kh,
        x.stride(0), w.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n,
        BLOCK_M=cfg.block_m,
        BLOCK_KH=cfg.block_kh,
        SPLIT_K=split,
        EVEN_K=kh % (split * cfg.block_kh) == 0,
        SCALED=scaled,
        HAS_BIAS=bias is not None,
        INTERLEAVE=cfg.interleave,
        FAST_UNPACK=not INTERPRET,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **opts,
    )
    return out
