"""The normal form fold rules are matched in: a canonical copy of the graph, for matching only.

The copy never runs, so normalising cannot change what the compiled graph computes; a fold found
in it is applied to the real graph through ``origin`` (the node computing a view node's value)
and ``region`` (the real nodes that exist only to compute it).  What becomes one form:
* dtype casts and views that keep the last dim (``unsqueeze(1)``, ``reshape`` to [M, K]) vanish;
* ``torch.chunk`` / ``split`` + indexing, ``x[..., a:b]`` and ``narrow`` on the last dim are
  ``torch.narrow(x, -1, start, length)``;
* ``operator.mul`` / ``torch.mul`` / ``.mul()`` are ``torch.mul`` (``add`` alike), a constant operand
  second; both orders of two nodes are left to the matcher (rule.commuted);
* ``x + x * w`` is ``x * (w + 1)``;
* every linear is ``F.linear(x, w, b)`` with b None when absent.
A value used through several casts counts each consumer: a view node's ``users`` are the real
ops that read its value.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from quantvla_fx.graph_utils import LINEAR_TARGETS, linear_args

LINEAR = torch.nn.functional.linear
_CASTS = {"to", "float", "double", "half", "bfloat16", "type_as", "contiguous"}
_MULS = {operator.mul, torch.mul, "mul"}
_ADDS = {operator.add, torch.add, "add"}
_SPLITS = {torch.chunk, torch.split, "chunk", "split"}


def unnormalised(*args, **kwargs):
    """Target of a copied op that calls a normal-form function in another form (``torch.add(a, b,
    alpha=2)``): patterns must not take it for the normal form (Inductor's ignore extra kwargs)."""
    raise AssertionError("the normal view is for matching only")


_NORMAL_TARGETS = {torch.add, torch.mul, torch.narrow, LINEAR}


def _value(n) -> Any:
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def _is_last(dim, ndim: int) -> bool:
    return isinstance(dim, int) and ndim > 0 and dim % ndim == ndim - 1


class NormalView:
    def __init__(self, graph: fx.Graph):
        self.graph = fx.Graph()
        self.of: dict[fx.Node, fx.Node] = {}  # real node -> view node of its value
        self.origin: dict[fx.Node, Optional[fx.Node]] = {}  # view node -> real node computing it
        self.region: dict[fx.Node, list[fx.Node]] = {}  # view node -> real nodes only it needs
        self._transparent: set[fx.Node] = set()
        self._pieces: dict[fx.Node, tuple[fx.Node, list[int], list[int]]] = {}  # split -> (source, starts, lengths)
        for n in graph.nodes:
            self._add(n)
        self._distribute()

    # -- phase 1: one real node at a time -------------------------------------------------
    def _add(self, n: fx.Node) -> None:
        if self._is_transparent(n):
            self._transparent.add(n)
            self.of[n] = self.of[n.args[0]]
            return
        pieces = self._split_pieces(n)
        if pieces is not None:
            self._pieces[n] = pieces
            return
        target, args = self._canonical(n)
        if target is None:
            v = self.graph.node_copy(n, lambda a: self.of[a])
            if v.op == "call_function" and v.target in _NORMAL_TARGETS:
                v.target = unnormalised
        else:
            v = self.graph.call_function(target, args)
            v.meta["example_value"] = _value(n)
        self.of[n], self.origin[v] = v, n
        self.region[v] = [n] + self._exclusive_chain(n)

    def _is_transparent(self, n: fx.Node) -> bool:
        if not n.args or not isinstance(n.args[0], fx.Node) or n.op not in ("call_method", "call_function"):
            return False
        if n.op == "call_method" and n.target in _CASTS:
            return True
        src, out = _value(n.args[0]), _value(n)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dim() == 0 or out.dim() == 0:
            return False
        if n.target in ("unsqueeze", torch.unsqueeze):  # a new dim before the last keeps the rows
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return out.shape[-1] == src.shape[-1] and not _is_last(dim, out.dim())
        if n.target in ("view", "reshape", torch.reshape):  # [.., K] -> [.., K]: rows stay rows
            return out.shape[-1] == src.shape[-1] and out.numel() == src.numel()
        return False

    def _exclusive_chain(self, n: fx.Node) -> list[fx.Node]:
        """The casts and views between n and its inputs that nothing but n reads."""
        chain = []
        for a in n.all_input_nodes:
            while a in self._transparent and len(a.users) == 1:
                chain.append(a)
                a = a.args[0]
        return chain

    def _split_pieces(self, n: fx.Node):
        """chunk/split along the last dim whose every user takes one piece: the pieces' extents."""
        if n.op not in ("call_function", "call_method") or n.target not in _SPLITS:
            return None
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        src, out = _value(n.args[0]), _value(n)
        if not isinstance(src, torch.Tensor) or not isinstance(out, (tuple, list)) or not _is_last(dim, src.dim()):
            return None
        if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in n.users):
            return None
        lengths = [int(t.shape[-1]) for t in out]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        return self.of[n.args[0]], starts, lengths

    def _canonical(self, n: fx.Node) -> tuple[Any, tuple]:
        """(target, args) of n's normal form, or (None, ()) to copy n as it is."""
        of = lambda a: self.of[a] if isinstance(a, fx.Node) else a  # noqa: E731
        if n.op == "call_function" and n.target in LINEAR_TARGETS:
            return LINEAR, tuple(of(a) for a in linear_args(n))
        if n.op not in ("call_function", "call_method"):
            return None, ()
        if n.target is operator.getitem and n.args[0] in self._pieces:
            src, starts, lengths = self._pieces[n.args[0]]
            return torch.narrow, (src, -1, starts[n.args[1]], lengths[n.args[1]])
        if n.target is operator.getitem:
            extent = _last_dim_slice(_value(n.args[0]), n.args[1])
            return (torch.narrow, (of(n.args[0]), -1) + extent) if extent else (None, ())
        if n.target in (torch.narrow, "narrow") and len(n.args) == 4 and not n.kwargs:
            ok = _is_last(n.args[1], _value(n.args[0]).dim()) if isinstance(_value(n.args[0]), torch.Tensor) else False
            return (torch.narrow, (of(n.args[0]), -1, n.args[2], n.args[3])) if ok else (None, ())
        for ops, target in ((_MULS, torch.mul), (_ADDS, torch.add)):
            if n.target in ops and len(n.args) == 2 and n.kwargs.get("alpha", 1) == 1 and set(n.kwargs) <= {"alpha"}:
                a, b = (of(x) for x in n.args)
                return target, ((b, a) if not isinstance(a, fx.Node) else (a, b))  # a constant goes second
        return None, ()

    # -- phase 2: algebra on the view ---------------------------------------------------
    def _distribute(self) -> None:
        """x + x*w (either order, the product used only there) -> x * (w + 1)."""
        for v in list(self.graph.nodes):
            if v.target is not torch.add or v.op != "call_function":
                continue
            for x, prod in (v.args, v.args[::-1]):
                is_product = isinstance(prod, fx.Node) and prod.target is torch.mul and prod.op == "call_function"
                if not (is_product and len(prod.users) == 1 and x in prod.args):
                    continue
                w = prod.args[1] if prod.args[0] is x else prod.args[0]
                with self.graph.inserting_before(v):
                    one_plus = self.graph.call_function(torch.add, (w, 1))
                    new = self.graph.call_function(torch.mul, (x, one_plus))
                new.meta["example_value"] = v.meta.get("example_value")
                self.region[one_plus], self.origin[one_plus] = self.region.pop(prod), None
                self.region[new], self.origin[new] = self.region.pop(v), self.origin.pop(v)
                self.origin.pop(prod)
                v.replace_all_uses_with(new)
                self.graph.erase_node(v)
                self.graph.erase_node(prod)
                self.of = {r: (new if m is v else m) for r, m in self.of.items() if m is not prod}
                break


def _last_dim_slice(src, idx) -> Optional[tuple[int, int]]:
    """(start, length) when ``src[idx]`` slices only the last dim with step 1."""
    if not isinstance(src, torch.Tensor) or src.dim() == 0:
        return None
    full = slice(None, None, None)
    if isinstance(idx, slice) and src.dim() == 1:
        last = idx
    elif isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice):
        last = idx[1]
    elif (isinstance(idx, tuple) and len(idx) == src.dim() and isinstance(idx[-1], slice)
          and all(i == full for i in idx[:-1])):
        last = idx[-1]
    else:
        return None
    if not all(isinstance(p, (int, type(None))) for p in (last.start, last.stop, last.step)):
        return None
    start, stop, step = last.indices(int(src.shape[-1]))
    return (start, stop - start) if step == 1 and stop > start else None
