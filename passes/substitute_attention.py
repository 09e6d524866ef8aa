"""Pass: ``scaled_dot_product_attention`` -> ``quantvla::attention`` where that is provably the same.

Rewritten when (1) the K/V heads are shared by groups of query heads in a layout
``attention_layout`` recognises (MHA, ``enable_gqa``, K/V expanded per head, or query heads folded
into rows as our Pi05 writes it), and (2) the mask is provably key padding plus query padding
(``attention_mask``: no mask, or an additive 0 / large-finite-negative mask built from pad masks).
The op receives the unexpanded K/V, q (B, Hq, Lq, D), and key_valid (B, Lk) / query_valid (B, Lq)
computed by new nodes from the same pad masks; the kernel is picked behind the op from
``QuantVLAConfig.attention``.  Every SDPA call gets a report record: rewritten, or why not.
"""
from __future__ import annotations

import torch
from torch import fx

import quantvla_fx.ops  # noqa: F401  (registers torch.ops.quantvla.*)
from quantvla_fx.attention_support import report_name
from quantvla_fx.graph_utils import call_site_fqn, propagate_fake
from quantvla_fx.report import AttentionRecord
from quantvla_fx.rewrite_context import RewriteContext

from .attention_layout import arg, as_rows, head_dtype_ok, layout
from .attention_mask import MaskAnalysis, Padding, Unproven, classify, emit_validity

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default)


def _padding(analysis: MaskAnalysis, mask, rows: int, lk: int) -> tuple[Padding, str]:
    if mask is None:
        return Padding((), ()), "none"
    allowed, _ = analysis.padding(mask)
    if allowed.shape[2] not in (1, rows) or allowed.shape[3] not in (1, lk):
        raise Unproven(f"mask shape {allowed.shape} does not broadcast to {rows} rows x {lk} keys")
    pad = classify(allowed)
    kind = "key + query padding" if pad.rows else ("key padding" if pad.keys else "none (all visible)")
    return pad, kind


def _check_call(node: fx.Node) -> str:
    if arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
        return "dropout_p > 0"
    if bool(arg(node, 5, "is_causal", False)):
        return "is_causal=True: no Pi0.5 graph needs a causal op, so none is rewritten"
    return ""


def substitute_attention(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    graph = gm.graph
    choice = ctx.config.attention
    analysis = MaskAnalysis()
    cache: dict = {}  # emitted factor expressions and validity tensors, shared by calls with one mask
    tracer = fx.proxy.GraphAppendingTracer(graph)  # one tracer: cached proxies mix with new ones
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]:
        rec = AttentionRecord(ctx.graph_id, node.name, call_site_fqn(node))
        ctx.report.attention.append(rec)
        if choice == "sdpa":
            rec.reason = "attention='sdpa': the pass is off"
            continue
        rec.reason = _check_call(node)
        lay, why = layout(node)
        if rec.reason or lay is None:
            rec.reason = rec.reason or why
            continue
        rec.reason = head_dtype_ok(lay) or ""
        if rec.reason:
            continue
        b, hq, lq, d = lay.q.meta["example_value"].shape
        hkv, lk = lay.k.meta["example_value"].shape[1:3]
        rec.layout = lay.kind
        try:
            sdpa_rows = node.args[0].meta["example_value"].shape[2]
            pad, rec.mask = _padding(analysis, arg(node, 3, "attn_mask"), sdpa_rows, lk)
        except Unproven as e:
            rec.reason = str(e)
            continue
        rows = pad.rows
        if lay.folded:
            rows = pad.unfolded_rows(lay.groups)
            if rows is None:  # rows of the mask do not repeat per folded head: keep the rows folded
                lay = as_rows(node)
                b, hq, lq, d = lay.q.meta["example_value"].shape
                rows = pad.rows
                rec.layout = "folded (kept as rows: the mask rows do not repeat per head)"
        scale = arg(node, 6, "scale", None)
        scale = float(scale) if scale is not None else float(node.args[0].meta["example_value"].shape[-1]) ** -0.5
        rec.shape = f"{b}, {hq}/{hkv}, {lq}×{lk}, {d}"

        def build(P, lay=lay, rows=rows, pad=pad, scale=scale, b=b, lq=lq, lk=lk, hkv=hkv):
            def ones(shape):
                return P(lay.q).new_ones(shape, dtype=torch.bool)

            kv = _cached(cache, ("keys", pad.keys, b, lk), lambda: emit_validity(pad.keys, 3, b, lk, P, ones, cache))
            qv = _cached(cache, ("rows", rows, b, lq), lambda: emit_validity(rows, 2, b, lq, P, ones, cache))
            out = torch.ops.quantvla.attention.default(P(lay.q), P(lay.k), P(lay.v), kv, qv, scale, choice)
            if lay.folded:
                out = out.reshape(b, hkv, lay.groups * lq, d)
            return out

        out = _insert_before(ctx, tracer, node, build)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        rec.rewritten = True
        rec.reason = f"{rec.mask}; {lay.kind} heads"
        rec.kernel = report_name(choice, lay.q.meta["example_value"].device)
    return gm


def _cached(cache: dict, key, make):
    """Proxies emitted for an earlier call sit before it, so later calls with the same mask reuse them."""
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _insert_before(ctx: RewriteContext, tracer, anchor: fx.Node, build) -> fx.Node:
    graph = anchor.graph

    def P(n):
        return fx.Proxy(n, tracer) if isinstance(n, fx.Node) else n

    start = anchor.prev
    with graph.inserting_before(anchor):
        out = build(P).node
    new, n = [], start.next
    while n is not anchor:
        new.append(n)
        n = n.next
    propagate_fake(ctx.gm, ctx.inputs.fake_mode, new)
    stack = anchor.meta.get("nn_module_stack")
    if stack is not None:
        for n in new:
            n.meta.setdefault("nn_module_stack", stack)
    return out
