"""Pass 3: attach DuQuant transforms to input groups; fold what algebra allows, the rest runs online.

Per group (linears reading one activation) the pack's transform is  x -> x/s -> R1 -> P -> R2.
* Smoothing ``1/s`` is folded, exactly, into the op before when the pattern allows:
  - a Gemma RMSNorm ``normed * (1 + w)`` whose weight is a graph input: ``w' = (1 + w)/s - 1``
    becomes a derived graph input (recomputed if w changes) for this use;
  - an adaRMS norm ``normed * (1 + scale) + shift`` with ``[scale|shift|gate] = dense(cond)``:
    the scale and shift rows of dense's weight and bias (gate rows untouched);
  - an elementwise product with a linear's output (GeGLU ``act(gate) * up`` feeding down_proj):
    the up linear's output rows are divided by s (its weight recipe absorbs ``diag(1/s)``).
  Otherwise ``x / s`` runs online, where Inductor fuses it with the norm and the quantization.
* Rotations and the permutation always run online (index_select + block matmul), once per group.
* Weights absorb the inverse transform before packing (quantize_weights uses group.transform).
No pass keeps tensors in the graph: every transform tensor is a derived graph input.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from quantvla_fx.graph_utils import LINEAR_TARGETS, param_fqn
from quantvla_fx.rewrite_context import GroupSite, RewriteContext

log = logging.getLogger("quantvla_fx")

_CASTS = {"to", "float", "type_as", "bfloat16", "half", "contiguous"}
_MULS = {operator.mul, torch.mul}
_ADDS = {operator.add, torch.add}


def fold_duquant(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    if ctx.packs is None:
        return gm
    from quantvla_fx.duquant.packs import PackError

    for group in list(ctx.groups):
        packs = [ctx.packs.get(s.record.fqn) for s in group.members]
        if all(p is None for p in packs):
            for s in group.members:
                s.record.duquant.append("no DuQuant pack: round-to-nearest")
            continue
        missing = [s.record.fqn for s, p in zip(group.members, packs) if p is None]
        first = next(p for p in packs if p is not None)
        if missing:
            raise PackError(f"{ctx.packs.file_of_pack(first)}: group {group.name}: layers {missing} read the same "
                            f"activation as {first.fqn} but have no pack", fqn=missing[0], field="group")
        for s, p in zip(group.members, packs):
            if p.transform.in_features != s.record.in_features:
                raise PackError(f"{ctx.packs.file_of_pack(p)}: layer {p.fqn}: field 'in_features': pack has "
                                f"{p.transform.in_features}, the layer has {s.record.in_features}", fqn=p.fqn, field="in_features")
            s.pack = p
        for sub in _split_by_transform(ctx, group):
            _plan_group(gm, ctx, sub)
    if ctx.kept and not any(s.pack is not None for s in ctx.kept) and len(ctx.packs):
        # Almost always a naming mismatch (e.g. a "model." prefix): say so instead of silently using RTN.
        msg = (f"DuQuant packs were given but none of their {len(ctx.packs)} layers matches the "
               f"{len(ctx.kept)} selected linears of graph {ctx.graph_id} (packs name e.g. "
               f"{next(iter(ctx.packs))!r}, the graph {ctx.kept[0].record.fqn!r}); these run round-to-nearest")
        log.warning("quantvla: %s", msg)
        ctx.report.notes.append(msg)
    return gm


def _split_by_transform(ctx: RewriteContext, group: GroupSite) -> list[GroupSite]:
    """One activation transform + quantization per distinct transform among a group's members.

    DuQuant's packs share one transform per input group; QuantVLA's weight-derived packs give
    gate and up (q, k, v) their own, so such a group quantizes its input once per member.
    """
    by_fp: dict[str, list] = {}
    for s in group.members:
        by_fp.setdefault(s.pack.transform.fingerprint(), []).append(s)
    subs = []
    for i, members in enumerate(by_fp.values()):
        sub = group if i == 0 else GroupSite(name=group.name, input_node=group.input_node)
        sub.members, sub.transform = members, members[0].pack.transform
        for s in members:
            s.group = sub
            if len(by_fp) > 1:
                s.record.duquant.append(f"own input transform ({len(by_fp)} distinct in the group)")
        if i:
            ctx.groups.insert(ctx.groups.index(group) + i, sub)
        subs.append(sub)
    return subs


def _plan_group(gm: fx.GraphModule, ctx: RewriteContext, group: GroupSite) -> None:
    t = group.transform
    notes: list[str] = []
    smooth_online = t.smooth is not None
    if t.smooth is not None and ctx.config.duquant_fold:
        where = (_fold_into_norm(gm, ctx, group) or _fold_into_adarms(ctx, group)
                 or _fold_into_producer_rows(ctx, group))
        if where:
            smooth_online = False
            notes.append(f"smoothing folded into {where}")
        else:
            notes.append("smoothing online (no foldable producer)")
    elif t.smooth is not None:
        notes.append("smoothing online (duquant_fold=False)")
    names, tensors = [], []
    if smooth_online:
        names.append("smooth"), tensors.append(t.smooth)
    rots = {"rot1": t.rot1, "perm": t.perm, "rot2": t.rot2}
    for k, v in rots.items():
        if v is not None:
            names.append(k), tensors.append(v[0] if k != "perm" and v.shape[0] == 1 else v)
    device = group.members[0].weight.device
    xv = group.input_node.meta["example_value"]
    compute_dtype = torch.promote_types(xv.dtype, torch.float32)  # fp64 stays fp64 (exactness checks)
    if names:
        gname = "qv_" + "".join(c if c.isalnum() else "_" for c in group.name)
        consts = tuple(x.to(device) if x.dtype == torch.int64 else x.to(device, compute_dtype) for x in tensors)
        nodes = ctx.add_derived(tuple(f"{gname}_{n}" for n in names), (), lambda: consts,
                                ("duquant-online", t.fingerprint(), smooth_online, str(device), str(compute_dtype)))
        by_name = dict(zip(names, nodes))
        shared = {n: v.dim() == 2 for n, v in zip(names, consts)}
        group.online = _online_fn(by_name, shared, t.block_size, t.in_features, compute_dtype)
        online = [n for n in ("rot1", "perm", "rot2") if n in by_name]
        if online:
            notes.append(" → ".join(online) + f" online (block {t.block_size})")
    for s in group.members:
        s.record.duquant.extend(notes)
        if s.pack is not None and s.pack.out_rot is not None:
            (node,) = ctx.add_derived((f"qv_{s.record.node}_out_rot",), (), lambda r=s.pack.out_rot.to(device): (r,),
                                      ("duquant-out-rot", s.record.fqn, t.fingerprint()))
            s.pack.out_rot_node = node
            s.record.duquant.append("output rotation restored online")


def _online_fn(nodes: dict, shared: dict, block: int, k: int, compute_dtype: torch.dtype):
    nb = k // block

    def rotate(x, name):
        r = nodes[name]
        if shared[name]:  # one matrix shared by all blocks (DuQuant's code)
            return torch.matmul(x.unflatten(-1, (nb, block)), r).flatten(-2)
        # Per-block matrices: one batched matmul over blocks, tokens flattened.
        xb = x.flatten(0, -2).unflatten(-1, (nb, block)).transpose(0, 1)
        return torch.bmm(xb, r).transpose(0, 1).reshape_as(x)

    def online(x):
        x = x.to(compute_dtype)
        if "smooth" in nodes:
            x = x / nodes["smooth"]
        if "rot1" in nodes:
            x = rotate(x, "rot1")
        if "perm" in nodes:
            x = torch.index_select(x, -1, nodes["perm"])
        if "rot2" in nodes:
            x = rotate(x, "rot2")
        return x

    # The online function receives graph Proxies; the transform tensors are looked up as nodes.
    def traced(x):
        proxies = {k: fx.Proxy(v, x.tracer) for k, v in nodes.items()}
        saved = dict(nodes)
        nodes.update(proxies)
        try:
            return online(x)
        finally:
            nodes.clear()
            nodes.update(saved)

    return traced


def _strip_casts(node, single_user: bool = True) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back through dtype casts; returns (first non-cast node, the casts passed)."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS:
        if single_user and len(node.users) != 1:
            break
        chain.append(node)
        node = node.args[0]
    return node, chain


def _only_feeds(node: fx.Node, allowed: set) -> bool:
    return all(u in allowed for u in node.users)


def _is_mul(n) -> bool:
    return isinstance(n, fx.Node) and ((n.op == "call_function" and n.target in _MULS) or (n.op == "call_method" and n.target == "mul"))


def _is_add(n) -> bool:
    return isinstance(n, fx.Node) and ((n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target == "add"))


def _group_producer(group: GroupSite) -> Optional[fx.Node]:
    """The op whose (cast) output is the group input, if that output feeds only the group."""
    members = {s.node for s in group.members}
    x = group.input_node
    if not _only_feeds(x, members):
        return None
    node, _ = _strip_casts(x.args[0], True) if (x.op == "call_method" and x.target in _CASTS) else (x, [])
    return node if node is x or len(node.users) == 1 else None


def _group_mul(group: GroupSite) -> Optional[fx.Node]:
    node = _group_producer(group)
    return node if _is_mul(node) and len(node.users) == 1 else None


def _one_plus(node) -> Optional[fx.Node]:
    """For ``1 + e`` (through casts, single use) return e, else None."""
    add, _ = _strip_casts(node)
    if not _is_add(add) or len(add.users) != 1:
        return None
    a, b = add.args[:2]
    one, expr = (a, b) if isinstance(a, (int, float)) else (b, a)
    return expr if isinstance(one, (int, float)) and float(one) == 1.0 and isinstance(expr, fx.Node) else None


def _first_use_in_chain(src: fx.Node, expr: fx.Node) -> fx.Node:
    """The node of the single-use cast chain ``src -> ... -> expr`` that reads ``src``."""
    node = expr
    while node.args and node.args[0] is not src:
        node = node.args[0]
    return node


def _fold_into_norm(gm: fx.GraphModule, ctx: RewriteContext, group: GroupSite) -> Optional[str]:
    """normed * (1 + w) -> normed * (1 + w') with w' = (1 + w)/s - 1 (a derived graph input)."""
    mul = _group_mul(group)
    if mul is None:
        return None
    for operand in mul.args[:2]:
        wexpr = _one_plus(operand)
        if wexpr is None:
            continue
        w, _ = _strip_casts(wexpr)
        pos = ctx.input_position(w) if isinstance(w, fx.Node) else None
        if pos is None or not isinstance(ctx.example_inputs[pos], torch.Tensor):
            continue
        real = ctx.example_inputs[pos]
        if real.dim() != 1 or real.shape[0] != group.transform.in_features:
            continue
        s = group.transform.smooth

        def fold(wt, s=s):
            return (((1.0 + wt.double()) / s.to(wt.device, torch.float64) - 1.0).to(wt.dtype),)

        name = param_fqn(w) or w.name
        (new,) = ctx.add_derived((f"qv_{w.name}_smoothed",), (pos,), fold, ("duquant-norm-fold", group.transform.fingerprint()))
        # Only this use: the same norm weight may be read elsewhere (another call of the module).
        consumer = _first_use_in_chain(w, _one_plus(operand))
        consumer.replace_input_with(w, new)
        return f"norm weight {name} ((1+w)/s − 1)"
    return None


_VIEWS = {"unsqueeze"}


def _fold_into_adarms(ctx: RewriteContext, group: GroupSite) -> Optional[str]:
    """normed·(1+scale) + shift with [scale|shift|gate] = dense(cond): divide the scale and shift
    rows of ``dense`` by s (``W_s/s``, ``(b_s+1)/s − 1``; ``W_h/s``, ``b_h/s``); gate rows stay."""
    top = _group_producer(group)
    if not _is_add(top):
        return None
    k = group.transform.in_features
    kept = {s.node for s in ctx.kept}
    for mul_arg, shift_arg in ((top.args[0], top.args[1]), (top.args[1], top.args[0])):
        mul, _ = _strip_casts(mul_arg)
        shift, _ = _strip_casts(shift_arg)
        if not _is_mul(mul) or len(mul.users) != 1 or not _is_getitem(shift, 1):
            continue
        for operand in mul.args[:2]:
            scale_expr = _one_plus(operand)
            scale = _strip_casts(scale_expr)[0] if scale_expr is not None else None
            if not _is_getitem(scale, 0) or scale.args[0] is not shift.args[0]:
                continue
            dense = _dense_of_chunk(scale.args[0])
            if dense is None or dense in kept:
                continue
            _, w, b = (dense.args + (None,) * 3)[:3]
            pw, pb = ctx.input_position(w), ctx.input_position(b) if isinstance(b, fx.Node) else None
            if pw is None or pb is None or tuple(ctx.example_inputs[pw].shape)[0] != 3 * k:
                continue
            s = group.transform.smooth

            def fold(wt, bt, s=s):
                sd = s.to(wt.device, torch.float64)
                w2, b2 = wt.double().clone(), bt.double().clone()
                w2[: 2 * k] /= torch.cat((sd, sd))[:, None]
                b2[:k] = (b2[:k] + 1.0) / sd - 1.0
                b2[k : 2 * k] /= sd
                return w2.to(wt.dtype), b2.to(bt.dtype)

            new_w, new_b = ctx.add_derived((f"qv_{w.name}_smoothed", f"qv_{b.name}_smoothed"), (pw, pb), fold,
                                           ("duquant-adarms-fold", group.transform.fingerprint()))
            dense.replace_input_with(w, new_w)
            dense.replace_input_with(b, new_b)
            return f"adaRMS {param_fqn(w) or w.name} (scale and shift rows)"
    return None


def _is_getitem(node, index: int) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[1] == index and len(node.users) == 1)


def _dense_of_chunk(chunk) -> Optional[fx.Node]:
    """chunk(dense(cond)[.unsqueeze(..)], 3, dim=-1) -> the dense linear call."""
    is_chunk = isinstance(chunk, fx.Node) and (
        (chunk.op == "call_function" and chunk.target is torch.chunk) or (chunk.op == "call_method" and chunk.target == "chunk"))
    if not is_chunk or chunk.args[1] != 3 or chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0) not in (-1,):
        return None
    node = chunk.args[0]
    while isinstance(node, fx.Node) and ((node.op == "call_method" and node.target in _VIEWS | _CASTS) and len(node.users) == 1):
        node = node.args[0]
    ok = isinstance(node, fx.Node) and node.op == "call_function" and node.target in LINEAR_TARGETS and len(node.users) == 1
    return node if ok else None


def _fold_into_producer_rows(ctx: RewriteContext, group: GroupSite) -> Optional[str]:
    """act(gate) * up -> act(gate) * (up / s): divide a quantized producer linear's output rows."""
    mul = _group_mul(group)
    if mul is None:
        return None
    sites = {s.node: s for s in ctx.kept}
    for operand in mul.args[:2]:
        lin, _ = _strip_casts(operand)
        site = sites.get(lin)
        if site is None or lin.target not in LINEAR_TARGETS or len(lin.users) != 1 or site.bias is not None:
            continue
        if site.record.out_features != group.transform.in_features:
            continue
        s = group.transform.smooth
        site.row_div = s if site.row_div is None else site.row_div * s
        site.record.duquant.append(f"output rows divided by the smoothing of {group.name}")
        return f"{site.record.fqn} output rows"
    return None
