"""Proves that an SDPA mask is key padding (plus query padding): an abstract evaluation of its graph.

The mask's producers are evaluated in a small abstract domain instead of being matched as one
spelling, so openpi's mask (pad-mask outer products, block masks from cumsum, ``torch.where``,
``repeat`` for folded heads) and plain PyTorch masks (``masked_fill`` of zeros) are read alike:

* ``Const``: a value that depends on no runtime data (``torch.ones``, ``arange == 0``, ``zeros_like``
  of an input, and anything computed only from those) is computed at compile time, on the CPU.
* ``Sep``: a bool tensor that is the AND of *factors*, each a tensor (an expression over existing
  graph nodes) that broadcasts to the value and varies along few axes.  AND, views, ``expand``,
  ``repeat``, ``cat`` and a constant all-True operand keep this form; anything else makes the node a
  factor of its own (always valid: it is its own value).
* ``Additive``: ``where(allowed, 0, c)`` with a finite ``c <= MASKED_AT_MOST``, through casts and views.

At the SDPA the mask (..., R, Lk) is key padding if every factor varies only along batch and keys,
plus query padding for factors that vary only along batch and rows.  A factor that varies along
both (a causal or block-causal mask), a -inf or bool mask (whose fully masked rows are NaN or 0,
not uniform), or a value the domain does not model is refused with the reason.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from quantvla_fx.attention_support import MASKED_AT_MOST

# Expressions (hashable tuples over graph nodes) that build a factor when emitted:
#   ("node", n, index, shape)  n[index].reshape(shape)      (index: None or a tuple of slices)
#   ("repeat", e, reps)         e.repeat(reps)
#   ("not", e)                  ~e
#   ("cat", (e, ...), dim)      torch.cat(..., dim)
#   ("and", (e, ...), shape)    (e & ...).expand(shape), or all-True of shape if empty
Expr = tuple


class Unproven(Exception):
    """The mask is not provably key/query padding; the message says why."""


@dataclass(frozen=True)
class Const:
    value: torch.Tensor


@dataclass(frozen=True)
class Sep:
    shape: tuple[int, ...]
    factors: tuple[tuple[Expr, tuple[int, ...]], ...]  # (expr, shape of its value: 1 where it broadcasts)


@dataclass(frozen=True)
class Additive:
    allowed: Sep
    masked: float  # the value at masked positions, as it is in ``dtype``
    dtype: torch.dtype


Value = Union[Const, Sep, Additive]

# Ops computed at compile time when every tensor operand is a Const (pure and deterministic).
_CONST_OK = {
    "getitem", "eq", "ne", "le", "lt", "ge", "gt", "and_", "or_", "invert", "logical_and", "logical_or",
    "logical_not", "add", "sub", "mul", "neg", "cumsum", "sum", "cat", "where", "to", "expand", "expand_as",
    "repeat", "reshape", "view", "unsqueeze", "squeeze", "transpose", "permute", "contiguous", "bool", "float",
    "int", "long", "ones", "zeros", "full", "arange", "tensor", "masked_fill", "repeat_interleave", "flip",
    "ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full", "type_as", "clone",
}
_SHAPE_ONLY = {"ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full"}
_MAX_CONST_ELEMENTS = 1 << 26


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        t = node.target
        if t is operator.getitem:
            return "getitem"
        return getattr(t, "__name__", str(t)).lstrip("_") if t not in (operator.and_, operator.or_, operator.invert) \
            else {operator.and_: "and_", operator.or_: "or_", operator.invert: "invert"}[t]
    return node.op


def _meta(node) -> Any:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def static_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    v = _meta(node)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in v.shape) if all(isinstance(s, int) for s in v.shape) else None
    except TypeError:
        return None


def _cpu(kwargs: dict) -> dict:
    return {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}


class MaskAnalysis:
    """Abstract values of mask-producing nodes, memoised over one graph."""

    def __init__(self):
        self._memo: dict[fx.Node, Any] = {}

    # -- entry -----------------------------------------------------------------------------
    def padding(self, mask: fx.Node, ndim_out: int = 4) -> tuple[Sep, float]:
        """(allowed as Sep aligned to 4-D, masked value) of an SDPA additive mask, or Unproven."""
        val = self.value(mask)
        if isinstance(val, Const):
            val = self._const_additive(mask, val)
        if isinstance(val, Sep) or (isinstance(_meta(mask), torch.Tensor) and _meta(mask).dtype == torch.bool):
            raise Unproven("boolean mask: SDPA gives fully masked rows 0 (math) or NaN, not the uniform rows "
                           "of a finite additive mask; not rewritten")
        if not isinstance(val, Additive):
            raise Unproven(f"the mask `{mask.name}` is not an additive 0 / large-negative mask the analysis can follow")
        return _align(val.allowed, ndim_out), val.masked

    # -- abstract evaluation ---------------------------------------------------------------
    def value(self, node: Any) -> Optional[Value]:
        if not isinstance(node, fx.Node):
            return None
        if node not in self._memo:
            try:
                self._memo[node] = self._eval(node)
            except Unproven as e:
                self._memo[node] = e
        out = self._memo[node]
        if isinstance(out, Unproven):
            raise out
        return out

    def _eval(self, node: fx.Node) -> Optional[Value]:
        if node.op not in ("call_function", "call_method"):
            return self._leaf(node)
        name = op_name(node)
        const = self._try_const(node, name)
        if const is not None:
            return const
        rule = getattr(self, f"_r_{name}", None)
        out = rule(node) if rule is not None else None
        return out if out is not None else self._leaf(node)

    def _leaf(self, node: fx.Node) -> Optional[Sep]:
        shape = static_shape(node)
        v = _meta(node)
        if shape is None or v.dtype != torch.bool:
            return None
        return Sep(shape, ((("node", node, None, shape), shape),))

    def _try_const(self, node: fx.Node, name: str) -> Optional[Const]:
        if name not in _CONST_OK:
            return None
        shape = static_shape(node)
        if shape is None or torch.Size(shape).numel() > _MAX_CONST_ELEMENTS:
            return None
        if name in _SHAPE_ONLY:
            src = _meta(node.args[0])
            like = torch.empty(tuple(src.shape), dtype=src.dtype)
            args = (like,) + tuple(node.args[1:])
            kwargs = _cpu(dict(node.kwargs))
            if any(isinstance(a, fx.Node) for a in args[1:]) or any(isinstance(a, fx.Node) for a in kwargs.values()):
                return None
        else:
            ok = True

            def conc(a):
                nonlocal ok
                if isinstance(a, fx.Node):
                    v = self.value(a)
                    if not isinstance(v, Const):
                        ok = False
                        return None
                    return v.value
                return a

            args = torch.fx.node.map_aggregate(node.args, conc)
            kwargs = _cpu(dict(torch.fx.node.map_aggregate(dict(node.kwargs), conc)))
            if not ok:
                return None
            if name == "to":  # keep it on the CPU: drop device arguments
                args = tuple(a for a in args if not isinstance(a, (torch.device, str)))
        try:
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        except Exception:
            return None
        return Const(out) if isinstance(out, torch.Tensor) else None

    # -- conversions -----------------------------------------------------------------------
    def _sep(self, a: Any) -> Optional[Sep]:
        """A bool operand as Sep (constants reduced to the axes they vary along)."""
        if isinstance(a, fx.Node):
            v = self.value(a)
            if isinstance(v, Const):
                return self._const_sep(a, v.value)
            return v if isinstance(v, Sep) else None
        return None

    @staticmethod
    def _const_sep(node: fx.Node, c: torch.Tensor) -> Optional[Sep]:
        if c.dtype != torch.bool:
            return None
        shape = tuple(c.shape)
        if bool(c.all()):
            return Sep(shape, ())
        index = tuple(slice(0, 1) if s > 1 and bool((c == c.narrow(ax, 0, 1)).all()) else slice(None)
                      for ax, s in enumerate(shape))
        reduced = tuple(1 if ix == slice(0, 1) else s for ix, s in zip(index, shape))
        return Sep(shape, ((("node", node, index, reduced), reduced),))

    def _const_additive(self, node: fx.Node, c: Const) -> Optional[Additive]:
        t = c.value
        if not t.is_floating_point():
            return None
        zero = t == 0
        low = t[~zero]
        if low.numel() and not (bool((low == low.flatten()[0]).all()) and _is_masked(float(low.flatten()[0]))):
            return None
        masked = float(low.flatten()[0]) if low.numel() else float("-3e38")
        sep = self._const_sep(node, zero) if low.numel() else Sep(tuple(t.shape), ())
        if low.numel():  # the factor must read `node == 0`, not node: a view of the comparison
            (expr, shape), = sep.factors
            sep = Sep(sep.shape, ((("eq0", expr), shape),))
        return Additive(sep, masked, t.dtype)

    # -- rules for bool (Sep) and additive values ------------------------------------------
    def _view_like(self, node: fx.Node, new_shape: tuple[int, ...], fn) -> Optional[Value]:
        """Apply ``fn(Sep) -> Sep`` to a Sep or an Additive's Sep."""
        src = self.value(node.args[0])
        if isinstance(src, Const):
            src = self._const_sep(node.args[0], src.value) if src.value.dtype == torch.bool else \
                self._const_additive(node.args[0], src)
        if isinstance(src, Sep):
            out = fn(src)
            return out
        if isinstance(src, Additive):
            out = fn(src.allowed)
            return None if out is None else Additive(out, src.masked, src.dtype)
        return None

    def _r_getitem(self, node):
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not all(i is None or i is Ellipsis or i == slice(None) for i in idx):
            return None
        shape = static_shape(node)
        if shape is None:
            return None
        src_nd = len(static_shape(node.args[0]) or ())
        # positions of source axes in the output: walk the index like numpy does
        n_ell = src_nd - sum(1 for i in idx if i is not None and i is not Ellipsis)
        out_axes, ax = [], 0
        for i in idx:
            if i is None:
                out_axes.append(None)
            elif i is Ellipsis:
                out_axes.extend(range(ax, ax + n_ell))
                ax += n_ell
            else:
                out_axes.append(ax)
                ax += 1
        out_axes.extend(range(ax, src_nd))
        if len(out_axes) != len(shape):
            return None
        return self._view_like(node, shape, lambda s: _insert_ones(s, shape, out_axes))

    def _r_unsqueeze(self, node):
        shape = static_shape(node)
        return None if shape is None else self._view_like(node, shape, lambda s: _reshape_ones(s, shape))

    def _r_view(self, node):
        shape = static_shape(node)
        return None if shape is None else self._view_like(node, shape, lambda s: _reshape_ones(s, shape))

    _r_reshape = _r_view
    _r_squeeze = _r_view

    def _r_contiguous(self, node):
        shape = static_shape(node)
        return None if shape is None else self._view_like(node, shape, lambda s: s)

    _r_clone = _r_contiguous

    def _r_expand(self, node):
        shape = static_shape(node)
        return None if shape is None else self._view_like(node, shape, lambda s: _expand(s, shape))

    _r_expand_as = _r_expand

    def _r_repeat(self, node):
        shape = static_shape(node)
        reps = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
        if shape is None or not all(isinstance(r, int) for r in reps):
            return None
        return self._view_like(node, shape, lambda s: _repeat(s, shape, tuple(reps)))

    def _r_to(self, node):
        out = _meta(node)
        if not isinstance(out, torch.Tensor):
            return None
        src = self.value(node.args[0])
        if isinstance(src, Const):
            src = self._const_sep(node.args[0], src.value) if src.value.dtype == torch.bool else \
                self._const_additive(node.args[0], src)
        if out.dtype == torch.bool:
            return src if isinstance(src, Sep) else None
        if isinstance(src, Additive):
            return _cast(src, out.dtype)
        return None

    _r_type_as = _r_to

    def _r_bool(self, node):
        return self._r_to(node)

    def _r_float(self, node):
        return self._r_to(node)

    _r_half = _r_float
    _r_bfloat16 = _r_float
    _r_double = _r_float

    def _r_and_(self, node):
        shape = static_shape(node)
        a, b = self._sep(node.args[0]), self._sep(node.args[1])
        if shape is None or a is None or b is None:
            return None
        return Sep(shape, _dedupe(_align(a, len(shape)).factors + _align(b, len(shape)).factors))

    _r_logical_and = _r_and_
    _r_bitwise_and = _r_and_

    def _r_mul(self, node):
        return self._r_and_(node) if _meta(node) is not None and _meta(node).dtype == torch.bool else None

    def _r_invert(self, node):
        a = self._sep(node.args[0])
        if a is None or len(a.factors) != 1:
            return None
        (expr, shape), = a.factors
        return Sep(a.shape, ((("not", expr), shape),))

    _r_logical_not = _r_invert
    _r_bitwise_not = _r_invert

    def _r_cat(self, node):
        shape = static_shape(node)
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if shape is None or not isinstance(parts, (list, tuple)):
            return None
        dim %= len(shape)
        seps = [self._sep(p) for p in parts]
        if any(s is None or len(s.shape) != len(shape) for s in seps):
            return None
        along = [[f for f in s.factors if f[1][dim] > 1] for s in seps]
        across = [tuple(f for f in s.factors if f[1][dim] == 1) for s in seps]
        if any(set(a) != set(across[0]) for a in across):
            return None  # factors that differ between parts but not along `dim`: not separable this way
        axes = {ax for fs in along for _, fshape in fs for ax, n in enumerate(fshape) if n > 1 and ax != dim}
        pieces = []
        for s, fs in zip(seps, along):
            pshape = tuple(s.shape[ax] if ax in axes or ax == dim else 1 for ax in range(len(shape)))
            pieces.append(("and", tuple(e for e, _ in fs), pshape))
        cshape = tuple(shape[ax] if ax in axes or ax == dim else 1 for ax in range(len(shape)))
        factors = across[0] + (((("cat", tuple(pieces), dim), cshape),) if any(along) else ())
        return Sep(shape, factors)

    def _r_where(self, node):
        cond, a, b = (list(node.args) + [None] * 3)[:3]
        out = _meta(node)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        allowed = self._sep(cond)
        if allowed is None or not (_scalar(a) is not None and _scalar(b) is not None):
            return None
        a, b = _scalar(a), _scalar(b)
        shape = tuple(out.shape)
        if a == 0 and _is_masked(b):
            sep, masked = _expand(allowed, shape), b
        elif b == 0 and _is_masked(a):
            inv = self._invert(allowed)
            sep, masked = (None if inv is None else _expand(inv, shape)), a
        else:
            return None
        return None if sep is None else _cast(Additive(sep, masked, torch.float64), out.dtype)

    def _r_masked_fill(self, node):
        base, cond, fill = node.args[:3]
        out = _meta(node)
        bv = self.value(base)
        allowed = self._sep(cond)
        if not (isinstance(bv, Const) and bv.value.is_floating_point() and bool((bv.value == 0).all())):
            return None
        if allowed is None or _scalar(fill) is None or not _is_masked(_scalar(fill)):
            return None
        inv = self._invert(allowed)
        if inv is None:
            return None
        sep = _expand(inv, tuple(out.shape))
        return None if sep is None else _cast(Additive(sep, _scalar(fill), torch.float64), out.dtype)

    @staticmethod
    def _invert(s: Sep) -> Optional[Sep]:
        if len(s.factors) != 1:
            return None
        (expr, shape), = s.factors
        return Sep(s.shape, (((expr[1] if expr[0] == "not" else ("not", expr)), shape),))


# -- Sep algebra -----------------------------------------------------------------------------
def _dedupe(factors):
    return tuple(dict.fromkeys(factors))


def _view(expr: Expr, shape: tuple[int, ...], new: tuple[int, ...]) -> Expr:
    if shape == new:
        return expr
    if expr[0] == "node":
        return ("node", expr[1], expr[2], new)
    return ("view", expr, new)


def _align(s: Sep, ndim: int) -> Sep:
    """Left-pad to ``ndim`` axes (broadcasting)."""
    pad = ndim - len(s.shape)
    if pad <= 0:
        return s
    ones = (1,) * pad
    return Sep(ones + s.shape, tuple((_view(e, sh, ones + sh), ones + sh) for e, sh in s.factors))


def _expand(s: Sep, shape: tuple[int, ...]) -> Optional[Sep]:
    s = _align(s, len(shape))
    if any(n != m and n != 1 for n, m in zip(s.shape, shape)):
        return None
    return Sep(shape, s.factors)


def _insert_ones(s: Sep, shape: tuple[int, ...], out_axes: list) -> Sep:
    """Indexing with None / ':' / '...': the factors gain the same size-1 axes."""
    factors = []
    for e, fshape in s.factors:
        new = tuple(1 if a is None else fshape[a] for a in out_axes)
        factors.append((_view(e, fshape, new), new))
    return Sep(shape, tuple(factors))


def _reshape_ones(s: Sep, shape: tuple[int, ...]) -> Optional[Sep]:
    """A reshape that only adds or drops size-1 axes keeps every factor (same for each factor)."""
    src = [n for n in s.shape if n != 1]
    if src != [n for n in shape if n != 1]:
        return None
    # map each non-1 source axis to its output axis, in order
    src_axes = [i for i, n in enumerate(s.shape) if n != 1]
    dst_axes = [i for i, n in enumerate(shape) if n != 1]
    factors = []
    for e, fshape in s.factors:
        if any(fshape[i] != 1 for i, n in enumerate(s.shape) if n == 1):
            return None
        new = [1] * len(shape)
        for a, b in zip(src_axes, dst_axes):
            new[b] = fshape[a]
        factors.append((_view(e, fshape, tuple(new)), tuple(new)))
    return Sep(shape, tuple(factors))


def _repeat(s: Sep, shape: tuple[int, ...], reps: tuple[int, ...]) -> Optional[Sep]:
    s = _align(s, len(reps))
    factors = []
    for e, fshape in s.factors:
        r = tuple(k if n > 1 else 1 for k, n in zip(reps, fshape))
        new = tuple(n * k for n, k in zip(fshape, r))
        factors.append((e if all(k == 1 for k in r) else ("repeat", e, r), new))
    return Sep(shape, tuple(factors))


def _cast(a: Additive, dtype: torch.dtype) -> Additive:
    masked = float(torch.tensor(a.masked, dtype=torch.float64).to(dtype))
    if not _is_masked(masked):
        raise Unproven(f"the mask value {a.masked:g} becomes {masked:g} in {dtype}: fully masked rows would not be "
                       "uniform (SDPA gives NaN for -inf)")
    return Additive(a.allowed, masked, dtype)


def _scalar(a) -> Optional[float]:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


def _is_masked(x: float) -> bool:
    return math.isfinite(x) and x <= MASKED_AT_MOST


# -- emission ---------------------------------------------------------------------------------
def emit(expr: Expr, P, ones, cache: dict):
    """Build ``expr`` with proxies (``P(node)`` wraps a node, ``ones(shape)`` makes an all-True
    tensor on the right device); a sub-expression shared by several masks is built once."""
    if expr in cache:
        return cache[expr]
    kind = expr[0]
    if kind == "node":
        _, node, index, shape = expr
        t = P(node)
        if index is not None:
            t = t[index]
        out = t.reshape(shape)
    elif kind == "view":
        out = emit(expr[1], P, ones, cache).reshape(expr[2])
    elif kind == "repeat":
        out = emit(expr[1], P, ones, cache).repeat(*expr[2])
    elif kind == "not":
        out = ~emit(expr[1], P, ones, cache)
    elif kind == "eq0":
        out = emit(expr[1], P, ones, cache) == 0
    elif kind == "cat":
        out = torch.cat([emit(p, P, ones, cache) for p in expr[1]], dim=expr[2])
    elif kind == "and":
        _, parts, shape = expr
        out = None
        for p in parts:
            t = emit(p, P, ones, cache)
            out = t if out is None else out & t
        out = ones(shape) if out is None else out.expand(shape)
    else:
        raise AssertionError(kind)
    cache[expr] = out
    return out


@dataclass(frozen=True)
class Padding:
    """The mask as key padding (factors of axes {batch, key}) and query padding ({batch, row})."""

    keys: tuple[tuple[Expr, tuple[int, ...]], ...]
    rows: tuple[tuple[Expr, tuple[int, ...]], ...]

    def unfolded_rows(self, groups: int) -> Optional[tuple]:
        """The row factors of a mask repeated ``groups`` times along the rows (folded query heads),
        before the repeat: None if some row factor is not such a repeat."""
        out = []
        for e, shape in self.rows:
            if shape[2] == 1:
                out.append((e, shape))
            elif e[0] == "repeat" and e[2][2] == groups and all(r == 1 for i, r in enumerate(e[2]) if i != 2):
                out.append((e[1], shape[:2] + (shape[2] // groups,) + shape[3:]))
            else:
                return None
        return tuple(out)


def classify(allowed: Sep) -> Padding:
    """Split a 4-D Sep (B, H, R, Lk) into key and row factors, or Unproven."""
    keys, rows = [], []
    for e, shape in allowed.factors:
        deps = {ax for ax, n in enumerate(shape) if n > 1}
        if 1 in deps:
            raise Unproven("the mask differs between heads")
        if deps <= {0, 3}:
            keys.append((e, shape))
        elif deps <= {0, 2}:
            rows.append((e, shape))
        else:
            raise Unproven(f"the mask depends on query and key position together ({_describe(e)}): a causal or "
                           "block mask, which Pi0.5 does not use and the op does not take")
    return Padding(tuple(keys), tuple(rows))


def _describe(e: Expr) -> str:
    if e[0] == "node":
        return f"`{e[1].name}`"
    return f"{e[0]} of " + ", ".join(_describe(p) for p in (e[1] if e[0] in ("cat", "and") else (e[1],)))


def emit_validity(factors, axis: int, batch: int, length: int, P, ones, cache):
    """(B, L) bool: the AND of the factors' values along ``axis`` (2 rows, 3 keys); None if none."""
    out = None
    for e, shape in factors:
        t = emit(e, P, ones, cache).reshape(shape[0], shape[axis]).expand(batch, length)
        out = t if out is None else out & t
    return out
