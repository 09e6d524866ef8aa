"""Pass 4: declare each quantized linear's packed int4 weight and scales as new graph inputs.

No tensor is baked into the graph: the recipe (transform, group size, clip) is registered as a
derived input and recomputed from the live weight whenever it changes (see derived_inputs.py).
The linears of one transform group (q/k/v, gate/up: one activation, one quantization) get ONE
pack with their rows stacked (concat_recipe.py), so substitute_ops runs them as one GEMM; its
sources are every member's weight, so an edit of any one of them re-packs the group.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.fx as fx
from torchao.quantization.utils import compute_error

from quantvla_fx.concat_recipe import ConcatBias, ConcatRecipe
from quantvla_fx.kernel_support import cannot_run
from quantvla_fx.quant.int4_pack import unpack_int4
from quantvla_fx.quant.weights import dequantize_weight
from quantvla_fx.rewrite_context import LinearSite, PackedWeight, RewriteContext, TransformGroup
from quantvla_fx.weight_recipe import WeightRecipe

log = logging.getLogger("quantvla_fx")


def _safe(fqn: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", fqn)


def _recipe(ctx: RewriteContext, site: LinearSite) -> WeightRecipe:
    gs = site.record.group_size  # the scheme's group for this K (match_linears)
    fold = ctx.duquant.linears[site]  # what fold_duquant decided for this linear
    out_rot = fold.out_rot.tensor if fold.out_rot is not None else None
    recipe = WeightRecipe(gs, fold.clip, fold.transform, out_rot, fold.row_div, fold.rounding, site.record.fqn)
    return recipe


def quantize_weights(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    sqnr: dict = {}
    for tg in ctx.duquant.groups:
        why_not = _why_not_one_pack(ctx, tg)
        if why_not is None:
            _pack_group(ctx, tg, sqnr)
            continue
        if len(tg.members) > 1:
            log.info("quantvla: %s: one GEMM per linear (%s)", tg.group.name, why_not)
            for s in tg.members:
                s.record.duquant.append(f"own GEMM: {why_not}")
        for site in tg.members:
            _pack_one(ctx, site, sqnr)
    return gm


def _pack_one(ctx: RewriteContext, site: LinearSite, sqnr: dict) -> None:
    recipe = _recipe(ctx, site)
    name = _safe(site.record.fqn)
    if not ctx.config.quantize:
        (wfloat,) = ctx.inputs.add_derived((f"qv_{name}_wfloat",), (site.weight_pos,), recipe.float_weight,
                                           ("float",) + recipe.key)
        ctx.weights[site] = PackedWeight(wfloat)
        return
    packed, scale = ctx.inputs.add_derived(
        (f"qv_{name}_w4", f"qv_{name}_wscale"), (site.weight_pos,), recipe, recipe.key
    )
    ctx.weights[site] = PackedWeight(packed, scale)
    _record_sqnr(ctx, site, recipe, packed, scale, (0, site.record.out_features), sqnr)


def _why_not_one_pack(ctx: RewriteContext, tg: TransformGroup) -> Optional[str]:
    """None if the group's linears can run as one GEMM over stacked rows, else why not."""
    members = tg.members
    if len(members) < 2:
        return "a single linear"
    first = members[0]
    k = first.record.in_features
    out_dtypes = {s.node.meta["example_value"].dtype for s in members}
    if len(out_dtypes) > 1:
        return f"outputs in different dtypes {sorted(map(str, out_dtypes))}"
    if not ctx.config.quantize and len({s.weight.dtype for s in members}) > 1:
        return "float weights in different dtypes"
    if len({s.weight.device for s in members}) > 1:
        return "weights on different devices"
    if ctx.config.kernel != "auto":
        n = sum(s.record.out_features for s in members)
        why = cannot_run(ctx.config.kernel, n, k, first.record.group_size, first.weight.device, first.record.scheme)
        if why:
            return f"kernel {ctx.config.kernel!r} cannot take the stacked N={n}: {why}"
    return None


def _pack_group(ctx: RewriteContext, tg: TransformGroup, sqnr: dict) -> None:
    members = tg.members
    recipes = [_recipe(ctx, s) for s in members]
    name = "qv_" + _safe(tg.group.name)
    sources = tuple(s.weight_pos for s in members)
    stacked = ConcatRecipe(recipes, float_weights=not ctx.config.quantize)
    if ctx.config.quantize:
        packed, scale = ctx.inputs.add_derived((f"{name}_w4", f"{name}_wscale"), sources, stacked, stacked.key)
    else:
        (packed,), scale = ctx.inputs.add_derived((f"{name}_wfloat",), sources, stacked, stacked.key), None
    bias, in_pack = _stacked_bias(ctx, tg, name)
    start = 0
    for site, recipe in zip(members, recipes):
        rows = (start, start + site.record.out_features)
        start = rows[1]
        ctx.weights[site] = PackedWeight(packed, scale, rows, bias, site in in_pack)
        if ctx.config.quantize:
            _record_sqnr(ctx, site, recipe, packed, scale, rows, sqnr)


def _stacked_bias(ctx: RewriteContext, tg: TransformGroup, name: str):
    """The group GEMM's bias: the members' bias inputs stacked (zeros for the others), or None.

    A bias stays out of it (added to its own rows later) when the member restores an output
    rotation first, when it is computed in the graph rather than an input, or when the biases'
    dtypes differ.
    """
    linears = ctx.duquant.linears
    candidates = [s for s in tg.members if s.bias is not None and linears[s].out_rot is None
                  and ctx.inputs.position(s.bias) is not None]
    dtypes = {ctx.inputs.tensor(s.bias).dtype for s in candidates}
    if not candidates or len(dtypes) > 1:
        return None, set()
    spec = ConcatBias([s.record.out_features for s in tg.members], [s in candidates for s in tg.members])
    (bias,) = ctx.inputs.add_derived((f"{name}_bias",), tuple(ctx.inputs.position(s.bias) for s in candidates),
                                     spec, spec.key)
    return bias, set(candidates)


def _record_sqnr(ctx, site, recipe, packed, scale, rows, sqnr) -> None:
    """How much the int4 rounding alone loses on this weight (transformed basis); once per pack rows."""
    key = (packed, rows)
    if key not in sqnr:
        a, b = rows
        deq = dequantize_weight(unpack_int4(ctx.inputs.real[packed][a:b]), ctx.inputs.real[scale][a:b])
        with torch.no_grad():
            sqnr[key] = round(float(compute_error(recipe.transformed(site.weight), deq)), 2)
    site.record.sqnr_db = sqnr[key]
