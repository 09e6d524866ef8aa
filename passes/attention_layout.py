"""How an SDPA call shares K/V heads between query heads: the layouts PyTorch code writes.

* ``mha``: Hq == Hkv.
* ``enable_gqa``: ``scaled_dot_product_attention(..., enable_gqa=True)`` with Hq % Hkv == 0.
* ``expanded``: K and V repeated per query head, ``repeat_interleave(kv, G, dim=1)`` or HF's
  ``repeat_kv`` (``kv[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv*G, L, D)``): the op reads
  the unexpanded tensors.
* ``folded``: our Pi05's layout: the G query heads of each KV head folded into the row axis,
  ``q.reshape(B, Hkv, G*Lq, D)`` of q (B, Hkv*G, Lq, D) (row g*Lq + i is query i of head
  kv*G + g), with a mask whose rows repeat every Lq: the op takes q unfolded.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

from torch import fx

from .attention_mask import op_name, static_shape


@dataclass(frozen=True)
class Layout:
    kind: str
    q: fx.Node  # (B, Hq, Lq, D) as the op takes it
    k: fx.Node  # (B, Hkv, Lk, D)
    v: fx.Node
    groups: int  # Hq // Hkv
    folded: bool  # the SDPA output is op_out.reshape(B, Hkv, G*Lq, D)


def arg(node: fx.Node, pos: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _unexpanded(kv: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(kv0, G) if ``kv`` is kv0 repeated G times per head along dim 1, else None."""
    if not isinstance(kv, fx.Node):
        return None
    name = op_name(kv)
    shape = static_shape(kv)
    if name == "repeat_interleave" and shape is not None:
        src = kv.args[0]
        reps = arg(kv, 1, "repeats")
        dim = arg(kv, 2, "dim")
        src_shape = static_shape(src) if isinstance(src, fx.Node) else None
        if isinstance(reps, int) and dim in (1, -3) and src_shape is not None and len(src_shape) == 4:
            return src, reps
        return None
    if name in ("reshape", "view") and shape is not None and len(shape) == 4:
        e = kv.args[0]
        if not isinstance(e, fx.Node) or op_name(e) != "expand":
            return None
        es = static_shape(e)
        u = e.args[0]
        us = static_shape(u) if isinstance(u, fx.Node) else None
        if es is None or us is None or len(es) != 5 or us[2] != 1 or len(us) != 5:
            return None
        src = _unsqueezed_at_2(u)
        if src is None or es[:2] + es[3:] != shape[:1] + (es[1],) + shape[2:] or es[1] * es[2] != shape[1]:
            return None
        return src, es[2]
    return None


def _unsqueezed_at_2(u: fx.Node) -> Optional[fx.Node]:
    """kv0 if ``u`` is kv0 (4-D) with a new axis at 2 (``unsqueeze(2)`` or ``[:, :, None]``)."""
    name = op_name(u)
    src = u.args[0]
    if not isinstance(src, fx.Node) or len(static_shape(src) or ()) != 4:
        return None
    if name == "unsqueeze" and arg(u, 1, "dim") in (2, -3):
        return src
    if name == "getitem" and u.target is operator.getitem:
        idx = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
        full = slice(None)
        if idx in ((full, full, None), (full, full, None, Ellipsis), (full, full, None, full, full)):
            return src
    return None


def _unfolded_q(q: fx.Node, hkv: int) -> Optional[tuple[fx.Node, int]]:
    """(q0, G) if q = q0.reshape(B, Hkv, G*Lq, D) with q0 (B, Hkv*G, Lq, D), G > 1."""
    if op_name(q) not in ("reshape", "view"):
        return None
    q0 = q.args[0]
    s0, s = static_shape(q0) if isinstance(q0, fx.Node) else None, static_shape(q)
    if s0 is None or s is None or len(s0) != 4 or len(s) != 4:
        return None
    b, hq, lq, d = s0
    if hq % hkv or hq == hkv or s != (b, hkv, (hq // hkv) * lq, d):
        return None
    return q0, hq // hkv


def layout(sdpa: fx.Node) -> tuple[Optional[Layout], str]:
    """(Layout, "") or (None, why not)."""
    q, k, v = (arg(sdpa, i, n) for i, n in enumerate(("query", "key", "value")))
    shapes = [static_shape(t) if isinstance(t, fx.Node) else None for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return None, "q, k, v are not 4-D tensors of static shape"
    if bool(arg(sdpa, 7, "enable_gqa", False)):
        hq, hkv = shapes[0][1], shapes[1][1]
        if hq % hkv:
            return None, f"enable_gqa with {hq} query heads over {hkv} KV heads"
        return Layout("enable_gqa", q, k, v, hq // hkv, False), ""
    ek, ev = _unexpanded(k), _unexpanded(v)
    if ek is not None and ev is not None and ek[1] == ev[1]:
        return Layout("expanded", q, ek[0], ev[0], ek[1], False), ""
    hq, hkv = shapes[0][1], shapes[1][1]
    if hq != hkv:
        return None, f"{hq} query heads and {hkv} KV heads without enable_gqa"
    unfolded = _unfolded_q(q, hkv)
    if unfolded is not None:
        return Layout("folded", unfolded[0], k, v, unfolded[1], True), ""
    return Layout("mha", q, k, v, 1, False), ""


def as_rows(sdpa: fx.Node) -> Layout:
    """The call as it is: its rows are the queries of each KV head (a folded layout kept folded)."""
    q, k, v = (arg(sdpa, i, n) for i, n in enumerate(("query", "key", "value")))
    return Layout("rows", q, k, v, 1, False)


def head_dtype_ok(layout: Layout) -> Optional[str]:
    dts = {t.meta["example_value"].dtype for t in (layout.q, layout.k, layout.v)}
    if len(dts) != 1:
        return f"q, k, v dtypes differ ({sorted(map(str, dts))})"
    if not next(iter(dts)).is_floating_point:
        return f"dtype {next(iter(dts))}"
    return None

