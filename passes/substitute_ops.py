"""Pass 5: replace each selected linear with activation quantization + a quantvla custom op.

Per group: [online transform] -> per-token int8 quantization, both as plain aten ops inserted
before the group's first linear so Inductor fuses them into the producer's kernel; then per
linear either ``quantvla::w4a8_linear`` (scales applied in the kernel) or ``quantvla::w4a8_mm`` +
an aten dequant epilogue that Inductor fuses with what follows.  A ``w4a16`` group (weight-only)
gets no quantization: ``quantvla::w4a16_linear`` reads the activation in its own dtype.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg

import quantvla_fx.ops  # noqa: F401  (registers torch.ops.quantvla.*)
from quantvla_fx.duquant.transform import apply_activation_transform, restore_rows
from quantvla_fx.graph_utils import propagate_fake, trace_into
from quantvla_fx.kernel_support import kernel_arg, report_name
from quantvla_fx.quant.activations import quantize_per_token
from quantvla_fx.rewrite_context import LinearSite, OnlineTransform, OutputRotation, RewriteContext


# Quantized linears are inference-only: nothing differentiable may reach the custom ops (they have
# no autograd formula), so a bias that requires grad is detached.


def int32_epilogue(x_q, x_scale, w_packed, w_scale, bias, out_dtype, kernel):
    acc = torch.ops.quantvla.w4a8_mm.default(x_q, w_packed, kernel)
    out = acc.to(torch.float32) * x_scale * w_scale
    if bias is not None:
        out = out + bias.detach().to(torch.float32)
    return out.to(out_dtype)


def fused_linear(x_q, x_scale, w_packed, w_scale, bias, out_dtype, kernel):
    bias = bias.detach() if bias is not None else None
    return torch.ops.quantvla.w4a8_linear.default(x_q, x_scale, w_packed, w_scale, bias, out_dtype, kernel)


def weight_only_linear(x, w_packed, w_scale, bias, out_dtype, kernel):
    bias = bias.detach() if bias is not None else None
    return torch.ops.quantvla.w4a16_linear.default(x, w_packed, w_scale, bias, out_dtype, kernel)


def _to_dtype(x, dtype):
    return x.to(dtype)


def restored(y, out_rot, blocks, dtype, out_dtype, bias):
    """Undo a block-diagonal output rotation (QuantVLA's "restore" mode), then add the bias."""
    out = restore_rows(y, out_rot, blocks, dtype, out_dtype)
    return out if bias is None else out + bias.detach()


def online_nodes(graph: fx.Graph, online: OnlineTransform, x: fx.Node):
    """The one place an OnlineTransform becomes graph nodes: the function DuQuantTransform runs, traced."""
    return trace_into(graph, apply_activation_transform, x, online.dtype, online.smooth, online.rot1, online.perm,
                      online.rot2, online.blocks1, online.blocks2)


def restore_nodes(graph: fx.Graph, out_rot: OutputRotation, y: fx.Node, bias, out_dtype: torch.dtype):
    return trace_into(graph, restored, y, out_rot.node, out_rot.blocks, out_rot.dtype, out_dtype, bias)


def float_linear(x, w, bias):
    return torch.nn.functional.linear(x.to(w.dtype), w, bias)


def choose_epilogue(ctx: RewriteContext, site: LinearSite) -> str:
    if not ctx.config.quantize:
        return "float"
    if site.record.scheme == "w4a16":
        return "w4a16"
    # (QuantVLAConfig refuses int32 with per-group scales: one accumulator cannot take them.)
    return "fused" if ctx.config.epilogue == "auto" else ctx.config.epilogue


def _inserted_before(anchor: fx.Node, build) -> list[fx.Node]:
    """Run ``build()`` inserting before ``anchor``; returns its result and the new nodes in order."""
    start = anchor.prev
    with anchor.graph.inserting_before(anchor):
        result = build()
    new, n = [], start.next
    while n is not anchor:
        new.append(n)
        n = n.next
    return result, new


def _finish_nodes(ctx: RewriteContext, nodes: list[fx.Node], like: fx.Node) -> None:
    """Fake values for the new nodes, and the calling module of the linear they stand for (dumps)."""
    propagate_fake(ctx.gm, ctx.inputs.fake_mode, nodes)
    stack = like.meta.get("nn_module_stack")
    if stack is not None:
        for n in nodes:
            n.meta.setdefault("nn_module_stack", stack)


def substitute_ops(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    kernel = kernel_arg(ctx.config)  # the kernel name and this compile's kernel settings
    replaced: dict[fx.Node, fx.Node] = {}  # a group may read the output of an already replaced linear
    for tg in ctx.duquant.groups:
        first = min(tg.members, key=lambda s: order[s.node])
        x = replaced.get(tg.group.input_node, tg.group.input_node)

        def build_input(x=x, online=tg.online, weight_only=first.record.scheme == "w4a16"):
            dtype = x.meta["example_value"].dtype
            if online is not None:
                x = online_nodes(graph, online, x)
                if weight_only and ctx.config.quantize and dtype != online.dtype:
                    x = trace_into(graph, _to_dtype, x, dtype)  # W4A16 reads the model's dtype
            if ctx.config.quantize and not weight_only:
                return (x,) + tuple(trace_into(graph, quantize_per_token, x))
            return x, None, None

        (x, x_q, x_scale), new = _inserted_before(first.node, build_input)
        _finish_nodes(ctx, new, first.node)
        if ctx.weights[first].rows is not None:
            _one_gemm(ctx, tg, x, x_q, x_scale, kernel, replaced, order)
            continue
        for site in tg.members:
            out_dtype = site.node.meta["example_value"].dtype
            epilogue = choose_epilogue(ctx, site)
            out_rot = ctx.duquant.linears[site].out_rot
            bias = None if out_rot is not None else site.bias

            def build_op(site=site, epilogue=epilogue, out_rot=out_rot, bias=bias, out_dtype=out_dtype):
                y = _gemm(graph, epilogue, x, x_q, x_scale, ctx.weights[site], bias, out_dtype, kernel)
                if out_rot is not None:
                    y = restore_nodes(graph, out_rot, y, site.bias, out_dtype)
                return y

            y, new = _inserted_before(site.node, build_op)
            _finish_nodes(ctx, new, site.node)
            site.record.op = _OP_NAMES[epilogue]
            site.record.kernel = report_name(kernel, site.weight.device)  # chosen behind the op, at its first call
            _replace(graph, site, y, replaced)
    return gm


_OP_NAMES = {"fused": "quantvla::w4a8_linear", "int32": "quantvla::w4a8_mm + aten epilogue",
             "float": "aten.linear (quantize=False)", "w4a16": "quantvla::w4a16_linear"}


def _gemm(graph, epilogue, x, x_q, x_scale, weight, bias, out_dtype, kernel):
    if epilogue == "float":
        return trace_into(graph, float_linear, x, weight.packed, bias)
    if epilogue == "w4a16":
        return trace_into(graph, weight_only_linear, x, weight.packed, weight.scale, bias, out_dtype, kernel)
    fn = fused_linear if epilogue == "fused" else int32_epilogue
    return trace_into(graph, fn, x_q, x_scale, weight.packed, weight.scale, bias, out_dtype, kernel)


def _replace(graph: fx.Graph, site: LinearSite, y: fx.Node, replaced: dict) -> None:
    site.node.replace_all_uses_with(y)
    graph.erase_node(site.node)
    replaced[site.node] = y


def _one_gemm(ctx: RewriteContext, tg, x, x_q, x_scale, kernel, replaced: dict, order: dict) -> None:
    """The group's linears as ONE op over their stacked pack; each linear's output is a view of its rows.
    ``order``: the position of each original node (linears keep their relative order)."""
    graph = ctx.gm.graph
    members = sorted(tg.members, key=lambda s: order[s.node])
    first, pack = members[0], ctx.weights[members[0]]
    out_dtype = first.node.meta["example_value"].dtype
    epilogue = choose_epilogue(ctx, first)
    y_all, new = _inserted_before(first.node, lambda: _gemm(graph, epilogue, x, x_q, x_scale, pack, pack.bias,
                                                           out_dtype, kernel))
    _finish_nodes(ctx, new, first.node)
    n_all = sum(s.record.out_features for s in tg.members)
    names = ", ".join(f"`{s.record.fqn}`" for s in tg.members)
    for site in members:
        weight = ctx.weights[site]
        start, stop = weight.rows
        out_rot = ctx.duquant.linears[site].out_rot
        later_bias = None if weight.bias_in_pack else site.bias

        def build(site=site, start=start, stop=stop, out_rot=out_rot, later_bias=later_bias):
            y = graph.call_function(torch.narrow, (y_all, -1, start, stop - start))
            if out_rot is not None:
                return restore_nodes(graph, out_rot, y, later_bias, out_dtype)
            return y if later_bias is None else trace_into(graph, _add_bias, y, later_bias)

        y, new = _inserted_before(site.node, build)
        _finish_nodes(ctx, new, site.node)
        if _views_need_contiguous(ctx, site.node, y):
            with graph.inserting_after(y):
                y = graph.call_method("contiguous", (y,))
            _finish_nodes(ctx, [y], site.node)
        site.record.op = f"{_OP_NAMES[epilogue]}: one op for {names} (rows {start}:{stop} of {n_all})"
        site.record.kernel = report_name(kernel, site.weight.device)
        _replace(graph, site, y, replaced)


def _add_bias(y, bias):
    return y + bias.detach()


def _views_need_contiguous(ctx: RewriteContext, old: fx.Node, y: fx.Node) -> bool:
    """Whether a reader of the linear's output cannot take its rows as a strided view (e.g. .view
    merging the last dim); those get a contiguous copy, which Inductor fuses into the reader."""
    fake = y.meta["example_value"]
    if fake.is_contiguous():
        return False
    for user in old.users:
        if user.op not in ("call_function", "call_method"):
            continue
        args, kwargs = map_arg((user.args, user.kwargs), lambda n: fake if n is old else n.meta.get("example_value"))
        try:
            with ctx.inputs.fake_mode:
                if user.op == "call_function":
                    user.target(*args, **kwargs)
                else:
                    getattr(args[0], user.target)(*args[1:], **kwargs)
        except Exception:  # noqa: BLE001 (any failure means: give it a dense tensor)
            return True
    return False
