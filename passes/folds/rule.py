"""What a fold rule is: a pattern in the normal form (normalize.py) and what folding it means.

Patterns are Inductor's (``torch._inductor.pattern_matcher``), matched on the normal view at the
op that produces a group's input.  Inductor checks that every matched op except that root is
read only inside the match, so dividing the root by s changes nothing else.  A rule's ``fold``
checks what a pattern cannot say (shapes, graph inputs) and returns a Fold: data that the
fold_duquant stage applies to the real graph.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, PatternExpr

from quantvla_fx.graph_inputs import GraphInputs
from quantvla_fx.graph_utils import param_fqn
from quantvla_fx.rewrite_context import LinearSite

from .normalize import LINEAR, NormalView

# -- the pattern vocabulary: the normal form's ops ---------------------------------------------
Arg = KeywordArg  # a named operand: any node or constant, the same one wherever the name recurs


def mul(a, b) -> PatternExpr:
    return CallFunction(torch.mul, a, b)


def add(a, b) -> PatternExpr:
    return CallFunction(torch.add, a, b)


def narrow(x, start, length) -> PatternExpr:
    """Columns [start, start + length) of x's last dim (chunk, split and slicing normalise to it)."""
    return CallFunction(torch.narrow, x, -1, start, length)


def linear(x, w, b, read_elsewhere: bool = False) -> PatternExpr:
    """``read_elsewhere``: ops outside the match may read its output too (the rule checks which rows)."""
    return CallFunction(LINEAR, x, w, b, _users=MULTIPLE if read_elsewhere else 1)


_COMMUTATIVE = (torch.mul, torch.add)


def commuted(p, memo: Optional[dict] = None) -> list:
    """Every operand order of the pattern's adds and muls (constants stay second: the normal form)."""
    memo = {} if memo is None else memo
    if id(p) in memo:
        return memo[id(p)]
    out = [p]
    if isinstance(p, CallFunction):
        choices = [commuted(a, memo) if isinstance(a, PatternExpr) else [a] for a in p.args]
        swap = p.fns[0] in _COMMUTATIVE and all(isinstance(a, PatternExpr) for a in p.args)
        if swap or any(len(c) > 1 for c in choices):  # else keep p itself: a shared sub-pattern stays one
            out = []
            for args in itertools.product(*choices):
                out.append(CallFunction(p.fns, *args, _users=p.users))
                if swap:
                    out.append(CallFunction(p.fns, *args[::-1], _users=p.users))
    memo[id(p)] = out
    return out


# -- what a rule returns: a fold, as data ------------------------------------------------------
@dataclass(frozen=True)
class NewInputs:
    """Fold into weights: graph inputs ``compute(*sources)`` replace ``sources`` where ``readers`` read them."""

    where: str  # for the report: "smoothing folded into <where>"
    names: tuple[str, ...]
    sources: tuple[fx.Node, ...]  # Dynamo's placeholders (weights)
    compute: Callable[..., tuple[torch.Tensor, ...]]  # pure: source tensors -> new tensors
    key: tuple  # what besides the sources determines the result
    readers: tuple[fx.Node, ...]


@dataclass(frozen=True)
class DivideRows:
    """Fold into a quantized producer: its weight's rows, so its output rows, are divided by s."""

    where: str
    site: LinearSite


Fold = Union[NewInputs, DivideRows]


# -- what a rule sees --------------------------------------------------------------------------
@dataclass
class RuleMatch:
    bound: dict[str, Any]  # pattern name -> view node or constant
    matched: set  # the view nodes of the pattern's ops
    view: NormalView
    inputs: GraphInputs
    sites: dict[fx.Node, LinearSite]  # the selected linears by their node
    k: int  # the group's in_features
    smooth: torch.Tensor  # [K] the smoothing to fold
    fingerprint: str  # of the group's transform (derived-input keys)

    def __getitem__(self, name: str):
        """The real node bound to ``name`` (or the constant)."""
        v = self.bound[name]
        return self.view.origin.get(v) if isinstance(v, fx.Node) else v

    def weight(self, node, shape: Optional[tuple] = None) -> Optional[torch.Tensor]:
        """node's compile-time tensor if it is a graph input (of ``shape`` when given), else None."""
        t = self.inputs.tensor(node)
        return t if t is not None and (shape is None or tuple(t.shape) == tuple(shape)) else None

    def op(self, target) -> Optional[fx.Node]:
        """The real node of the match's one op calling ``target`` (a normal-form target, e.g. LINEAR)."""
        found = [self.view.origin.get(v) for v in self.matched if v.target is target]
        return found[0] if len(found) == 1 else None

    def site(self, node) -> Optional[LinearSite]:
        return self.sites.get(node)

    @staticmethod
    def param_name(node: fx.Node) -> str:
        return param_fqn(node) or node.name

    def readers(self, node: fx.Node) -> tuple[fx.Node, ...]:
        """The real nodes of the match that read ``node`` directly (where a substitution goes)."""
        region = [r for v in self.matched for r in self.view.region.get(v, ())]
        return tuple(dict.fromkeys(r for r in region if node in r.all_input_nodes))

    def other_reads(self, node: fx.Node) -> list[Optional[tuple[int, int]]]:
        """How ops outside the match read ``node``'s value: (start, length) of the last-dim columns
        for a narrow, None for anything else (reads it all)."""
        v = self.view.of[node]
        return [(u.args[2], u.args[3]) if u.target is torch.narrow else None for u in v.users if u not in self.matched]


class FoldRule:
    def __init__(self, name: str, pattern: PatternExpr, fold: Callable[[RuleMatch], Optional[Fold]]):
        self.name, self.pattern, self.fold = name, pattern, fold
        self.variants = commuted(pattern)

    def matches(self, anchor: fx.Node, **context) -> Iterator[RuleMatch]:
        """Every way the pattern matches with ``anchor`` (a view node) as its root."""
        for p in self.variants:
            m = p.match(anchor)
            if m:
                yield RuleMatch(dict(m.kwargs), set(m.nodes), **context)

    def __repr__(self):
        return f"FoldRule({self.name})"
