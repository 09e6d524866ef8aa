"""Pass 3: attach DuQuant transforms to input groups; fold what algebra allows, the rest runs online.

Per group (linears reading one activation) the pack's transform is  x -> x/s -> R1 -> P -> R2.
* Smoothing ``1/s`` is folded, exactly, into the op before when a rule of passes/folds matches
  there (Gemma ``(1 + w)`` norm weight, adaRMS scale/shift rows, a producer linear's rows);
  otherwise ``x / s`` runs online, where Inductor fuses it with the norm and the quantization.
* Rotations and the permutation always run online, once per group.
* Weights absorb the inverse transform before packing (quantize_weights reads the LinearFolds).
The result is ctx.duquant (rewrite_context.DuQuantPlan); every transform tensor is a derived input.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from quantvla_fx.duquant.transform import Blocks
from quantvla_fx.graph_utils import LINEAR_TARGETS, param_fqn
from quantvla_fx.rewrite_context import (DuQuantPlan, GroupSite, OnlineTransform, OutputRotation, RewriteContext,
                                         TransformGroup)


log = logging.getLogger("quantvla_fx")

_CASTS = {"to", "float", "type_as", "bfloat16", "half", "contiguous"}
_MULS = {operator.mul, torch.mul}
_ADDS = {operator.add, torch.add}


def fold_duquant(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    plan = ctx.duquant = DuQuantPlan.round_to_nearest(ctx)
    if ctx.packs is None:
        return gm
    from quantvla_fx.duquant.packs import PackError

    groups: list[TransformGroup] = []
    views: list[NormalView] = []  # built at the first fold looked for
    for group in ctx.groups:
        packs = [ctx.packs.get(s.record.fqn) for s in group.members]
        if all(p is None for p in packs):
            for s in group.members:
                s.record.duquant.append("no DuQuant pack: round-to-nearest")
            groups.append(TransformGroup(group, list(group.members)))
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
        for tg, tpacks in _split_by_transform(group, packs):
            _plan_group(gm, ctx, tg, tpacks, views)
            groups.append(tg)
    plan.groups = groups
    if ctx.kept and all(f.transform is None for f in plan.linears.values()) and len(ctx.packs):
        # Almost always a naming mismatch (e.g. a "model." prefix): say so instead of silently using RTN.
        msg = (f"DuQuant packs were given but none of their {len(ctx.packs)} layers matches the "
               f"{len(ctx.kept)} selected linears of graph {ctx.graph_id} (packs name e.g. "
               f"{next(iter(ctx.packs))!r}, the graph {ctx.kept[0].record.fqn!r}); these run round-to-nearest")
        log.warning("quantvla: %s", msg)
        ctx.report.notes.append(msg)
    return gm


def _split_by_transform(group: GroupSite, packs: list) -> list[tuple[TransformGroup, list]]:
    """One activation transform + quantization per distinct transform among a group's members.

    DuQuant's packs share one transform per input group; QuantVLA's weight-derived packs give
    gate and up (q, k, v) their own, so such a group quantizes its input once per member.
    """
    by_fp: dict[str, list] = {}
    for s, p in zip(group.members, packs):
        by_fp.setdefault(p.transform.fingerprint(), []).append((s, p))
    if len(by_fp) > 1:
        for s in group.members:
            s.record.duquant.append(f"own input transform ({len(by_fp)} distinct in the group)")
    return [(TransformGroup(group, [s for s, _ in pairs]), [p for _, p in pairs]) for pairs in by_fp.values()]


def _plan_group(gm: fx.GraphModule, ctx: RewriteContext, tg: TransformGroup, packs: list, views: list) -> None:
    t = packs[0].transform
    notes: list[str] = []
    smooth_online = t.smooth is not None
    if t.smooth is not None and ctx.config.duquant_fold:
        where = _fold_smoothing(gm, ctx, tg, t, views)
        if where:
            smooth_online = False
            notes.append(f"smoothing folded into {where}")
        else:
            notes.append("smoothing online (no foldable producer)")
    elif t.smooth is not None:
        notes.append("smoothing online (duquant_fold=False)")
    device = tg.members[0].weight.device
    dtype = torch.promote_types(tg.group.input_node.meta["example_value"].dtype, torch.float32)  # fp64 stays fp64
    tg.online = _online(ctx, tg.group.name, t, smooth_online, device, dtype)
    online = [n for n in ("rot1", "perm", "rot2") if getattr(t, n) is not None]
    if online:
        notes.append(" → ".join(online) + f" online (block {t.block_size})")
    for s, p in zip(tg.members, packs):
        fold = ctx.duquant.linears[s]
        fold.transform, fold.clip = t, p.weight_clip
        s.record.duquant.extend(notes)
        if p.out_rot is not None:
            fold.out_rot = _output_rotation(ctx, s, p, t, device)
            s.record.duquant.append("output rotation restored online")


def _online(ctx: RewriteContext, name: str, t, smooth_online: bool, device, dtype) -> Optional[OnlineTransform]:
    """The transform tensors that run online as derived inputs, in the compute dtype."""
    steps = {"smooth": t.smooth if smooth_online else None, "rot1": t.rot1, "perm": t.perm, "rot2": t.rot2}
    steps = {k: v for k, v in steps.items() if v is not None}
    if not steps:
        return None
    gname = "qv_" + "".join(c if c.isalnum() else "_" for c in name)
    consts = tuple(v.to(device) if v.dtype == torch.int64 else v.to(device, dtype) for v in steps.values())
    nodes = ctx.inputs.add_derived(tuple(f"{gname}_{n}" for n in steps), (), lambda: consts,
                                   ("duquant-online", t.fingerprint(), smooth_online, str(device), str(dtype)))
    by = dict(zip(steps, nodes))
    blocks = {n: Blocks.of(getattr(t, n), t.in_features) for n in ("rot1", "rot2") if n in by}
    return OnlineTransform(dtype, by.get("smooth"), by.get("rot1"), by.get("perm"), by.get("rot2"),
                           blocks.get("rot1"), blocks.get("rot2"))


def _output_rotation(ctx: RewriteContext, site, pack, t, device) -> OutputRotation:
    dtype = torch.promote_types(site.node.meta["example_value"].dtype, torch.float32)
    r = pack.out_rot
    (node,) = ctx.inputs.add_derived((f"qv_{site.record.node}_out_rot",), (), lambda r=r.to(device, dtype): (r,),
                                     ("duquant-out-rot", site.record.fqn, t.fingerprint(), str(dtype)))
    return OutputRotation(r, node, Blocks.of(r, site.record.out_features), dtype)


def _fold_smoothing(gm: fx.GraphModule, ctx: RewriteContext, tg: TransformGroup, t, views: list) -> Optional[str]:
    return _fold_into_norm(gm, ctx, tg, t) or _fold_into_adarms(ctx, tg, t) or _fold_into_producer_rows(ctx, tg, t)


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


def _group_producer(group: TransformGroup) -> Optional[fx.Node]:
    """The op whose (cast) output is the group input, if that output feeds only the group."""
    members = {s.node for s in group.members}
    x = group.group.input_node
    if not _only_feeds(x, members):
        return None
    node, _ = _strip_casts(x.args[0], True) if (x.op == "call_method" and x.target in _CASTS) else (x, [])
    return node if node is x or len(node.users) == 1 else None


def _group_mul(group: TransformGroup) -> Optional[fx.Node]:
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


def _fold_into_norm(gm: fx.GraphModule, ctx: RewriteContext, group: TransformGroup, t) -> Optional[str]:
    """normed * (1 + w) -> normed * (1 + w') with w' = (1 + w)/s - 1 (a derived graph input)."""
    mul = _group_mul(group)
    if mul is None:
        return None
    for operand in mul.args[:2]:
        wexpr = _one_plus(operand)
        if wexpr is None:
            continue
        w, _ = _strip_casts(wexpr)
        pos = ctx.inputs.position(w)
        real = ctx.inputs.tensor(w)
        if real is None or real.dim() != 1 or real.shape[0] != t.in_features:
            continue
        s = t.smooth

        def fold(wt, s=s):
            return (((1.0 + wt.double()) / s.to(wt.device, torch.float64) - 1.0).to(wt.dtype),)

        name = param_fqn(w) or w.name
        (new,) = ctx.inputs.add_derived((f"qv_{w.name}_smoothed",), (pos,), fold, ("duquant-norm-fold", t.fingerprint()))
        # Only this use: the same norm weight may be read elsewhere (another call of the module).
        consumer = _first_use_in_chain(w, _one_plus(operand))
        consumer.replace_input_with(w, new)
        return f"norm weight {name} ((1+w)/s − 1)"
    return None


_VIEWS = {"unsqueeze"}


def _fold_into_adarms(ctx: RewriteContext, group: TransformGroup, t) -> Optional[str]:
    """normed·(1+scale) + shift with [scale|shift|gate] = dense(cond): divide the scale and shift
    rows of ``dense`` by s (``W_s/s``, ``(b_s+1)/s − 1``; ``W_h/s``, ``b_h/s``); gate rows stay."""
    top = _group_producer(group)
    if not _is_add(top):
        return None
    k = t.in_features
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
            pw, pb = ctx.inputs.position(w), ctx.inputs.position(b)
            if pw is None or pb is None or tuple(ctx.inputs.example[pw].shape)[0] != 3 * k:
                continue
            s = t.smooth

            def fold(wt, bt, s=s):
                sd = s.to(wt.device, torch.float64)
                w2, b2 = wt.double().clone(), bt.double().clone()
                w2[: 2 * k] /= torch.cat((sd, sd))[:, None]
                b2[:k] = (b2[:k] + 1.0) / sd - 1.0
                b2[k : 2 * k] /= sd
                return w2.to(wt.dtype), b2.to(bt.dtype)

            new_w, new_b = ctx.inputs.add_derived((f"qv_{w.name}_smoothed", f"qv_{b.name}_smoothed"), (pw, pb), fold,
                                           ("duquant-adarms-fold", t.fingerprint()))
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


def _fold_into_producer_rows(ctx: RewriteContext, group: TransformGroup, t) -> Optional[str]:
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
        if site.record.out_features != t.in_features:
            continue
        s, fold = t.smooth, ctx.duquant.linears[site]
        fold.row_div = s if fold.row_div is None else fold.row_div * s
        site.record.duquant.append(f"output rows divided by the smoothing of {group.group.name}")
        return f"{site.record.fqn} output rows"
    return None
