"""Pass 4: declare each quantized linear's packed int4 weight and scales as new graph inputs.

No tensor is baked into the graph: the recipe (transform, group size, clip) is registered as a
derived input and recomputed from the live weight whenever it changes (see derived_inputs.py).
"""
from __future__ import annotations

import re

import torch.fx as fx
from torchao.quantization.utils import compute_error

from quantvla_fx.quant.int4_pack import unpack_int4
from quantvla_fx.quant.weights import dequantize_weight
from quantvla_fx.rewrite_context import PackedWeight, RewriteContext
from quantvla_fx.weight_recipe import WeightRecipe


def _safe(fqn: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", fqn)


def quantize_weights(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    gs = ctx.config.group_size
    sqnr: dict = {}
    for site in ctx.kept:
        fold = ctx.duquant.linears[site]  # what fold_duquant decided for this linear
        out_rot = fold.out_rot.tensor if fold.out_rot is not None else None
        recipe = WeightRecipe(gs, fold.clip, fold.transform, out_rot, fold.row_div)
        name = _safe(site.record.fqn)
        if not ctx.config.quantize:
            (wfloat,) = ctx.inputs.add_derived((f"qv_{name}_wfloat",), (site.weight_pos,), recipe.float_weight,
                                               ("float",) + recipe.key)
            ctx.weights[site] = PackedWeight(wfloat)
            continue
        packed, scale = ctx.inputs.add_derived(
            (f"qv_{name}_w4", f"qv_{name}_wscale"), (site.weight_pos,), recipe, recipe.key
        )
        ctx.weights[site] = PackedWeight(packed, scale)
        if packed not in sqnr:
            # How much the int4 rounding alone loses on this weight (transformed basis); once per pack.
            deq = dequantize_weight(unpack_int4(ctx.inputs.real[packed]), ctx.inputs.real[scale])
            sqnr[packed] = round(float(compute_error(recipe.transformed(site.weight), deq)), 2)
        site.record.sqnr_db = sqnr[packed]
    return gm
