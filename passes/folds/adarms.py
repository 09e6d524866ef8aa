"""adaRMS ``normed * (1 + scale) + shift`` with ``[scale|shift|gate] = dense(cond)``: 1/s goes into
the scale and shift rows of ``dense`` (scale: ``W/s``, ``(b + 1)/s − 1``; shift: ``W/s``, ``b/s``);
every other row (the gate) stays as it is.

``dense`` must be an unquantized linear of graph inputs whose other readers take none of the
folded rows (they see the new weight too).
"""
from __future__ import annotations

import torch

from .normalize import LINEAR
from .rule import Arg, FoldRule, NewInputs, RuleMatch, add, linear, mul, narrow

_DENSE = linear(Arg("cond"), Arg("w"), Arg("b"), read_elsewhere=True)  # the gate reads it too
PATTERN = add(mul(Arg("normed"), add(narrow(_DENSE, Arg("scale_at"), Arg("scale_len")), 1)),
              narrow(_DENSE, Arg("shift_at"), Arg("shift_len")))


def fold(m: RuleMatch):
    k, dense, w, b = m.k, m.op(LINEAR), m["w"], m["b"]
    if m["scale_len"] != k or m["shift_len"] != k or m.site(dense) or m.weight(w) is None or m.weight(b) is None:
        return None
    at = (m["scale_at"], m["shift_at"])
    if any(r is None or any(r[0] < a + k and a < r[0] + r[1] for a in at) for r in m.other_reads(dense)):
        return None
    return NewInputs(
        where=f"adaRMS {m.param_name(w)} (scale and shift rows)",
        names=(f"qv_{w.name}_smoothed", f"qv_{b.name}_smoothed"), sources=(w, b),
        compute=_SmoothedRows(m.smooth, *at), key=("duquant-adarms-fold", m.fingerprint, *at), readers=(dense,))


class _SmoothedRows:
    """(W, b) -> the scale rows and the shift rows divided by s (fp64, back in their dtypes)."""

    def __init__(self, s: torch.Tensor, scale_at: int, shift_at: int):
        self.s, self.scale_at, self.shift_at = s, scale_at, shift_at

    def __call__(self, w: torch.Tensor, b: torch.Tensor):
        sd, k = self.s.to(w.device, torch.float64), self.s.shape[0]
        scale, shift = slice(self.scale_at, self.scale_at + k), slice(self.shift_at, self.shift_at + k)
        w2, b2 = w.double().clone(), b.double().clone()
        w2[scale] /= sd[:, None]
        w2[shift] /= sd[:, None]
        b2[scale] = (b2[scale] + 1.0) / sd - 1.0
        b2[shift] /= sd
        return w2.to(w.dtype), b2.to(b.dtype)


RULE = FoldRule("adarms", PATTERN, fold)
