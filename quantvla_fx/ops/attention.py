"""``quantvla::attention``: softmax attention with grouped K/V heads and a key-padding description.

q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) with Hq % Hkv == 0 (query head h reads KV head
h // (Hq/Hkv)); key_valid (B, Lk) and query_valid (B, Lq) bool, None = all valid. Key j is visible
to query i iff both are valid; a row that sees no key gets a uniform softmax over all keys (the
finite-mask semantics of openpi's SDPA, see quantvla_fx/attention_support.py). Returns
(B, Hq, Lq, D) in q's dtype. The kernel is chosen at call time from the ``choice`` string
(``QuantVLAConfig.attention``; kernels/attention/select.py): the graph never names an implementation.
(Not called ``kernel``: Inductor's fallback lowering takes a keyword of that name.)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.attention import select


def _check(q, k, v, key_valid, query_valid) -> None:
    op = "quantvla::attention"
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{op}: q, k, v must be 4-D (B, H, L, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    b, hq, lq, d = q.shape
    torch._check(k.shape == v.shape, lambda: f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(k.shape[0] == b and k.shape[3] == d,
                 lambda: f"{op}: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head_dim")
    torch._check(hq % k.shape[1] == 0, lambda: f"{op}: {hq} query heads are not a multiple of {k.shape[1]} KV heads")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    for name, t, length in (("key_valid", key_valid, k.shape[2]), ("query_valid", query_valid, lq)):
        if t is not None:
            torch._check(t.dtype == torch.bool and t.dim() == 2 and t.shape[0] == b and t.shape[1] == length,
                         lambda name=name, t=t, length=length:
                         f"{op}: {name} must be bool (B={b}, {length}), got {t.dtype} {tuple(t.shape)}")


@torch.library.custom_op("quantvla::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
              query_valid: Optional[torch.Tensor], scale: float, choice: str = "auto") -> torch.Tensor:
    _check(q, k, v, key_valid, query_valid)
    padded = key_valid is not None or query_valid is not None
    impl = select.resolve(choice, q.device, q.dtype, q.shape[2], q.shape[3], padded)
    return impl(q, k, v, key_valid, query_valid, scale)


@attention.register_fake
def _attention_fake(q, k, v, key_valid, query_valid, scale, choice="auto"):
    _check(q, k, v, key_valid, query_valid)
    return q.new_empty(q.shape)
