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
from typing import Optional

import torch
import torch.fx as fx

from quantvla_fx.duquant.transform import Blocks
from quantvla_fx.rewrite_context import (DuQuantPlan, GroupSite, OnlineTransform, OutputRotation, RewriteContext,
                                         TransformGroup)

from .folds import RULES, DivideRows, Fold, NewInputs, NormalView

log = logging.getLogger("quantvla_fx")


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
        ctx.report.warn(msg)
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
        fold.transform, fold.clip, fold.rounding = t, p.weight_clip, p.rounding
        s.record.duquant.extend(notes)
        if p.search_note():
            s.record.duquant.append(p.search_note())
        if p.rounding is not None:
            s.record.duquant.append(f"int4 values from the pack ({p.rounding.method}) while the weight is unchanged")
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
    """Try the fold rules at the op producing the group's input; apply the first that folds."""
    if not views:
        views.append(NormalView(gm.graph))
    view = views[0]
    anchor = view.of[tg.group.input_node]
    # The producer's value must reach nothing but this group's linears: it is about to be divided by s.
    if not set(anchor.users) <= {view.of[s.node] for s in tg.members}:
        return None
    context = dict(view=view, inputs=ctx.inputs, sites={s.node: s for s in ctx.kept}, k=t.in_features,
                   smooth=t.smooth, fingerprint=t.fingerprint())
    for rule in RULES:
        for m in rule.matches(anchor, **context):
            fold = rule.fold(m)
            if fold is not None and _apply(ctx, tg, fold, t):
                log.debug("quantvla: %s: fold rule %s", tg.group.name, rule.name)
                return fold.where
    return None


def _apply(ctx: RewriteContext, tg: TransformGroup, fold: Fold, t) -> bool:
    if isinstance(fold, DivideRows):
        lf = ctx.duquant.linears[fold.site]
        lf.row_div = t.smooth if lf.row_div is None else lf.row_div * t.smooth
        fold.site.record.duquant.append(f"output rows divided by the smoothing of {tg.group.name}")
        return True
    assert isinstance(fold, NewInputs)
    if not all(any(src in r.all_input_nodes for r in fold.readers) for src in fold.sources):
        return False  # an earlier fold rewired these readers already
    positions = tuple(ctx.inputs.position(s) for s in fold.sources)
    new = ctx.inputs.add_derived(fold.names, positions, fold.compute, fold.key)
    for reader in fold.readers:
        for src, node in zip(fold.sources, new):
            if src in reader.all_input_nodes:
                reader.replace_input_with(src, node)
    return True
