"""Analysis 1: find every linear call, name it by its calling module, decide whether to quantize it.

Rules match the FQN of the module that *calls* the linear (so a tied ``lm_head`` is judged by its
own name, not by ``embed_tokens``).  Every linear gets a report record with the rule that selected
it or the reason it was skipped.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from quantvla_fx.graph_utils import LINEAR_TARGETS, call_site_fqn, linear_args, param_fqn, placeholder_real_tensor
from quantvla_fx.kernel_support import cannot_run
from quantvla_fx.report import LinearRecord
from quantvla_fx.rewrite_context import LinearSite, RewriteContext
from quantvla_fx.selection import SUPPORTED_DTYPES, weight_rule_violation

log = logging.getLogger("quantvla_fx")


def match_linears(gm: fx.GraphModule, ctx: RewriteContext) -> None:
    cfg = ctx.config
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, w, b = linear_args(node)
        wv = w.meta.get("example_value") if isinstance(w, fx.Node) else None
        xv = x.meta.get("example_value") if isinstance(x, fx.Node) else None
        pos = ctx.inputs.position(w)
        pfqn = param_fqn(w) if pos is not None else None
        fqn = call_site_fqn(node) or (pfqn.rsplit(".", 1)[0] if pfqn else node.name)
        n_out, k_in = (tuple(wv.shape) + (0, 0))[:2] if isinstance(wv, torch.Tensor) else (0, 0)
        rec = LinearRecord(
            graph=ctx.graph_id, node=node.name, fqn=fqn, param_fqn=pfqn,
            out_features=int(n_out), in_features=int(k_in),
            dtype=str(getattr(wv, "dtype", "?")).replace("torch.", ""),
            device=str(getattr(wv, "device", "?")),
        )
        ctx.report.linears.append(rec)
        selected, rec.reason = cfg.match(fqn)
        if not selected:
            continue
        scheme, by = cfg.scheme_for(fqn)  # a ConfigError naming the layer if two layer_schemes rules match
        rec.scheme = scheme
        if by != "scheme":
            rec.reason += f"; {scheme} by {by}"
        if scheme == "float":
            continue
        rec.group_size = cfg.group_size_for(scheme, int(k_in))
        real = placeholder_real_tensor(w, ctx.inputs.example, pos) if pos is not None else None
        why_not = _why_not_quantizable(real, wv, xv, k_in, n_out, cfg, scheme, rec.group_size)
        if why_not:
            rec.reason = f"skipped: {why_not}"
            log.warning("quantvla: %s (%s) not quantized: %s", fqn, node.name, why_not)
            continue
        rec.quantized = True
        ctx.sites.append(LinearSite(node, rec, x, pos, real, b))

    for rec in ctx.report.linears:
        level = logging.INFO if cfg.debug else logging.DEBUG
        log.log(level, "quantvla: graph %d %s %s: %s", ctx.graph_id, rec.fqn, "quantize" if rec.quantized else "keep", rec.reason)
    _warn_if_nothing_quantized(ctx)


def _warn_if_nothing_quantized(ctx: RewriteContext) -> None:
    """Say why a graph with linears got no quantized one: no rule matched, or each match was skipped."""
    records = ctx.report.linears
    if not records or any(r.quantized for r in records):
        return
    skipped = [r for r in records if r.reason.startswith("skipped")]
    if skipped:
        shown = "; ".join(f"{r.fqn}: {r.reason[len('skipped: '):]}" for r in skipped[:3])
        ctx.report.warn(f"graph {ctx.graph_id}: all {len(skipped)} selected linear(s) were skipped, nothing is "
                        f"quantized ({shown}{'; ...' if len(skipped) > 3 else ''})")
    elif not any(r.reason.startswith("included") for r in records):
        ctx.report.warn(f"include rules {list(ctx.config.include)} matched none of the {len(records)} linears "
                        f"in graph {ctx.graph_id} (calling modules such as {records[0].fqn!r})")


def _why_not_quantizable(real, wv, xv, k, n, cfg, scheme: str, group_size: int) -> str:
    if real is None or not isinstance(wv, torch.Tensor):
        return "the weight is computed inside the graph, not a parameter or input tensor"
    why = weight_rule_violation(tuple(wv.shape), wv.dtype, group_size, cfg.quantize)
    if why or not cfg.quantize:
        return why or ""
    if isinstance(xv, torch.Tensor) and xv.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {xv.dtype} is not supported by the W4A8 kernels (float32, bfloat16, float16)"
    if isinstance(xv, torch.Tensor) and xv.device != wv.device:
        return f"activation on {xv.device} but weight on {wv.device}"
    if cfg.kernel != "auto":
        reason = cannot_run(cfg.kernel, n, k, group_size, wv.device, scheme)  # shape rules only: nothing is built
        if reason:
            return f"kernel {cfg.kernel!r} cannot take it: {reason}"
    return ""
