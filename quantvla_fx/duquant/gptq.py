"""GPTQ int4 rounding in our weight format: symmetric int4 in [-8, 7], scales per channel or group.

torchao 0.18's ``prototype.gptq`` quantizes int4 *asymmetrically* (a zero point per group, through
mslk) into its own tensor subclass, which is not the format our kernels read (quant/weights.py,
quant/int4_pack.py), so this is our own implementation of Frantar et al.'s algorithm:

    quantize the columns of W one by one; after column j, spread its rounding error over the
    columns not yet quantized with the inverse-Hessian row (H = X^T X of the layer's inputs),
    which keeps ||X W^T - X Q^T|| small instead of ||W - Q||.

Scales are those of round-to-nearest (quant/weights.py: SYMMETRIC_NO_CLIPPING_ERR, times the clip
ratio), taken per output channel from the original weight, or per group from the group's columns
as GPTQ has updated them when the group is reached. With ``act_order`` columns are visited by
decreasing Hessian diagonal; per-group scales are then fixed up front from the original weight
("static groups"), because our format needs contiguous groups in the original column order.
Only the integer values change; the packing and the kernels stay as they are.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..quant.int4_pack import INT4_MAX, INT4_MIN
from ..quant.weights import quantize_weight_int4

DEFAULT_DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal (GPTQ's percdamp)
LAZY_BLOCK = 128  # columns per lazy batch of updates (per-channel scales)


def _rtn_scale(w: Tensor, clip: float) -> Tensor:
    """The RTN scale of each row of ``w`` [N, g] (exactly quantize_weight_int4's)."""
    return quantize_weight_int4(w, -1, clip)[1]


def _round(w: Tensor, scale: Tensor) -> Tensor:
    # The same rounding as torchao's quantize_affine with zero point 0 (half to even, then clamp).
    return torch.clamp(torch.round(w / scale), INT4_MIN, INT4_MAX)


def damped_hessian(h: Tensor, damp: float = DEFAULT_DAMP) -> tuple[Tensor, Tensor]:
    """(H + damp * mean(diag H) * I in fp64, mask of dead input channels (diag 0: never active))."""
    h = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    d = torch.diagonal(h)
    d += damp * float(d.mean())
    return h, dead


def gptq_quantize(w: Tensor, h: Tensor, group_size: int = -1, clip: float = 1.0, *,
                  damp: float = DEFAULT_DAMP, act_order: bool = False) -> tuple[Tensor, Tensor]:
    """W [N, K] and H [K, K] -> (int8 values in [-8, 7] [N, K], fp32 scale [N] or [N, K/g]).

    The same shapes and meaning as quant.weights.quantize_weight_int4 (the kernels' format).
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_quantize: W {tuple(w.shape)} and H {tuple(h.shape)} do not match ([N, K], [K, K])")
    n, k = w.shape
    g = k if group_size in (-1, None) else int(group_size)
    if k % g:
        raise ValueError(f"gptq_quantize: K={k} is not a multiple of group_size={g}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    dev = w.device
    wf = w.detach().to(device=dev, dtype=torch.float64).clone()
    hd, dead = damped_hessian(h.to(dev), damp)
    wf[:, dead] = 0.0
    # Scales: fixed up front (per channel; per group with act_order) or when a group is reached.
    static = g == k or act_order
    scale = _rtn_scale(wf.view(n * (k // g), g), clip).view(n, k // g).to(torch.float64) if static else \
        torch.zeros(n, k // g, dtype=torch.float64, device=dev)
    perm = torch.argsort(torch.diagonal(hd), descending=True, stable=True) if act_order else torch.arange(k, device=dev)
    wp, hp = wf[:, perm], hd[perm][:, perm]
    # Upper Cholesky factor of H^-1: row j holds the update that column j's error spreads forward.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    q = torch.zeros_like(wp)
    col_group = perm // g  # the scale group of each visited column
    block = g if not static else LAZY_BLOCK
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wp[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        if not static:  # the block is exactly one group: its scale from the updated columns
            scale[:, i1 // g] = _rtn_scale(w1.float(), clip).to(torch.float64)
        for i in range(i2 - i1):
            s = scale[:, col_group[i1 + i]]
            qi = _round(w1[:, i], s)
            q[:, i1 + i] = qi
            e = (w1[:, i] - qi * s) / u[i1 + i, i1 + i]
            w1[:, i:] -= e[:, None] * u[i1 + i, i1 + i:i2][None, :]
            err[:, i] = e
        wp[:, i2:] -= err @ u[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    scale = scale.to(torch.float32)
    return out.to(torch.int8), (scale.reshape(n) if g == k else scale).contiguous()


def gptq_reference(w: Tensor, h: Tensor, group_size: int = -1, clip: float = 1.0, *,
                   damp: float = DEFAULT_DAMP, act_order: bool = False) -> tuple[Tensor, Tensor]:
    """The definition, for tests on tiny matrices: after each column is rounded, the columns not yet
    rounded are re-solved in closed form to minimize (W - W') H (W - W')^T given those rounded.
    No Cholesky, no lazy batches: O(K^4). Same arguments and result as gptq_quantize."""
    n, k = w.shape
    g = k if group_size in (-1, None) else group_size
    hd, dead = damped_hessian(h, damp)
    w0 = w.detach().to(torch.float64).clone()
    w0[:, dead] = 0.0
    static = g == k or act_order
    order = torch.argsort(torch.diagonal(hd), descending=True, stable=True).tolist() if act_order else list(range(k))
    sc = torch.zeros(n, k // g, dtype=torch.float64)
    if static:
        for j in range(k // g):
            sc[:, j] = _rtn_scale(w0[:, j * g:(j + 1) * g], clip).to(torch.float64)
    cur = w0.clone()  # the current best float weight given the columns rounded so far
    q = torch.zeros_like(w0)
    done: list[int] = []
    for j in order:
        if not static and j % g == 0:
            sc[:, j // g] = _rtn_scale(cur[:, j:j + g].float(), clip).to(torch.float64)
        s = sc[:, j // g]
        q[:, j] = _round(cur[:, j], s)
        done.append(j)
        rest = [c for c in order if c not in done]
        if rest:
            # minimize over W'_rest: (W0 - W')H(W0 - W')^T with W'_done = Q_done s -> closed form
            delta_done = w0[:, done] - q[:, done] * sc[:, [c // g for c in done]]
            hrr = hd[rest][:, rest]
            hdr = hd[done][:, rest]
            cur[:, rest] = w0[:, rest] + torch.linalg.solve(hrr, (delta_done @ hdr).T).T
    return q.to(torch.int8), (sc.to(torch.float32).reshape(n) if g == k else sc.to(torch.float32))
