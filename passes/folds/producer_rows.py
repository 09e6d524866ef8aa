"""A product with a quantized linear's output (GeGLU ``act(gate) * up`` feeding down_proj): 1/s
goes into that linear's output rows, which its weight recipe divides by s.

The pattern asks for no bias (it would need dividing too) and for the linear's output to be read
only by the product.
"""
from __future__ import annotations

from .normalize import LINEAR
from .rule import Arg, DivideRows, FoldRule, RuleMatch, linear, mul

PATTERN = mul(Arg("other"), linear(Arg("x"), Arg("w"), None))


def fold(m: RuleMatch):
    lin = m.op(LINEAR)
    site = m.site(lin)
    if site is None or site.record.out_features != m.k or m["other"] is lin:  # x * x would need s²
        return None
    return DivideRows(where=f"{site.record.fqn} output rows", site=site)


RULE = FoldRule("producer_rows", PATTERN, fold)
