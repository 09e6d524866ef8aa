"""Gemma RMSNorm ``normed * (1 + w)``: 1/s goes into the norm weight, ``w' = (1 + w)/s − 1``.

w' is a derived graph input read by this use only: the same weight may be read elsewhere (another
call of the module) where nothing is folded.
"""
from __future__ import annotations

import torch

from .rule import Arg, FoldRule, NewInputs, RuleMatch, add, mul

PATTERN = mul(Arg("normed"), add(Arg("w"), 1))


def fold(m: RuleMatch):
    w = m["w"]
    readers = m.readers(w)
    if m.weight(w, shape=(m.k,)) is None or not readers:
        return None
    return NewInputs(
        where=f"norm weight {m.param_name(w)} ((1+w)/s − 1)",
        names=(f"qv_{w.name}_smoothed",), sources=(w,), compute=_Smoothed(m.smooth),
        key=("duquant-norm-fold", m.fingerprint), readers=readers)


class _Smoothed:
    """w -> (1 + w)/s − 1, in fp64, back in w's dtype."""

    def __init__(self, s: torch.Tensor):
        self.s = s

    def __call__(self, w: torch.Tensor):
        return (((1.0 + w.double()) / self.s.to(w.device, torch.float64) - 1.0).to(w.dtype),)


RULE = FoldRule("gemma_norm", PATTERN, fold)
