"""Fold rules: where a group's smoothing 1/s can go instead of running online.

One file per rule (a pattern and what folding it means, see rule.py), matched in the normal form
of normalize.py.  Tried in this order at the op producing a group's input; the first that folds
wins.  A new rule: add its file and list it here.
"""
from . import adarms, gemma_norm, producer_rows
from .normalize import NormalView
from .rule import DivideRows, Fold, FoldRule, NewInputs, RuleMatch

RULES: tuple[FoldRule, ...] = (gemma_norm.RULE, adarms.RULE, producer_rows.RULE)

__all__ = ["RULES", "DivideRows", "Fold", "FoldRule", "NewInputs", "NormalView", "RuleMatch"]
