"""The ``quantvla`` torch.compile backend: runs the rewrite passes in order, then Inductor.

Registered only through the ``torch_dynamo_backends`` entry point in pyproject.toml (a second
registration at import time would fail as a duplicate name).  It owns nothing but the order of
the passes, the dumps, and the wrapper that feeds weight-derived inputs on every call.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from quantvla_fx.passes.fold_duquant import fold_duquant
from quantvla_fx.passes.group_inputs import group_inputs
from quantvla_fx.passes.hoist_weight_only import find_weight_only, hoist_weight_only
from quantvla_fx.passes.match_linears import match_linears
from quantvla_fx.passes.quantize_weights import quantize_weights
from quantvla_fx.passes.substitute_attention import substitute_attention
from quantvla_fx.passes.substitute_ops import substitute_ops

from . import float_weights
from .config import QuantVLAConfig
from .derived_inputs import DerivedInputProvider
from .dump import GraphDumper
from .graph_utils import clone_graph_module, fake_mode_of, finish
from .inference_only import guard_outputs
from .kernel_support import device_reason
from .regions import lower_by_region
from .report import ReportBook
from .stage_timer import StageTimer

log = logging.getLogger("quantvla_fx")

# Analyses read the graph and record what they found (dumped as tables); passes change the graph.
# find_weight_only takes linears that hoist_weight_only will compute once out of quantization;
# the hoist runs last, so the passes before it see the weight-only subgraphs as written.
ANALYSES = (match_linears, find_weight_only, group_inputs)
PASSES = (fold_duquant, quantize_weights, substitute_ops, substitute_attention, hoist_weight_only)

_graph_ids = itertools.count()
_books: dict[Optional[str], ReportBook] = {}


def report_book(dump_dir: Optional[str]) -> ReportBook:
    """All graphs compiled in this process for one dump_dir (None: kept in memory only)."""
    if dump_dir not in _books:
        _books[dump_dir] = ReportBook(dump_dir)
    return _books[dump_dir]


def _inductor_patches(mode: Optional[str], config: QuantVLAConfig) -> dict:
    """Inductor settings for this compile: the mode's, then the user's ``inductor_options``."""
    patches = {} if mode is None or mode == "default" else dict(torch._inductor.list_mode_options(mode))
    if config.cudagraphs:
        patches["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
    patches.update(config.inductor_options)
    return patches


def _check_kernel_available(config: QuantVLAConfig, example_inputs) -> None:
    """A kernel the user forced must be able to run here: say so now, not at the first call."""
    if config.kernel == "auto":
        return
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)} or {torch.device("cpu")}
    for dev in devices:
        reason = device_reason(config.kernel, dev)  # rules only; building waits for the first call
        if reason:
            raise RuntimeError(f"quantvla: kernel={config.kernel!r} was requested but cannot run on {dev}: {reason}. "
                               "Use kernel='auto' to fall back to a kernel that can.")


def rewrite(gm: fx.GraphModule, example_inputs: list, config: QuantVLAConfig):
    """Run the passes on a clone of Dynamo's graph; returns (rewritten gm, context)."""
    from .rewrite_context import RewriteContext

    graph_id = next(_graph_ids)
    timer = StageTimer()
    with timer.stage("clone"):
        new_gm = clone_graph_module(gm)
        ctx = RewriteContext(new_gm, example_inputs, config, graph_id, fake_mode_of(gm), packs=_load_packs(config.packs))
    dumper = GraphDumper(config.dump_dir, graph_id)
    with timer.stage("dumps"):
        dumper.dump("dynamo", new_gm)
    for a in ANALYSES:
        with timer.stage(a.__name__):
            a(new_gm, ctx)
        ctx.report.passes.append(a.__name__)
        with timer.stage("dumps"):
            dumper.table(a.__name__, ctx.report.analysis_table(a.__name__))
    for p in PASSES:
        with timer.stage(p.__name__):
            new_gm = p(new_gm, ctx)
        ctx.report.passes.append(p.__name__)
        with timer.stage("dumps"):
            dumper.dump(p.__name__, new_gm)
    with timer.stage("finish"):
        finish(new_gm)
    with timer.stage("dumps"):
        dumper.node_table(new_gm)
    timer.add("packing (derived inputs, within the passes)", ctx.inputs.derive_s)
    ctx.report.timings_s = timer.rounded()
    report_book(config.dump_dir).add(ctx.report)
    log.info("quantvla: %s%s", ctx.report.summary(), f" (report: {config.dump_dir}/report.md)" if config.dump_dir else "")
    log.info("quantvla: graph %d rewrite took %.2f s (%d nodes): %s", graph_id,
             sum(v for k, v in timer.seconds.items() if not k.startswith("packing")), len(new_gm.graph.nodes), timer.line())
    return new_gm, ctx


def quantvla_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None):
    config = QuantVLAConfig.from_options(options)
    _check_kernel_available(config, example_inputs)
    with float_weights.borrowed(example_inputs):  # a recompile reads weights freed after an earlier packing
        new_gm, ctx = rewrite(gm, example_inputs, config)
        offload = float_weights.plan(new_gm, ctx.inputs, ctx.inputs.specs, config)  # freed at the first call
        patches = _inductor_patches(mode, config)
        t0 = time.perf_counter()
        plan = None
        by_region = _regions(new_gm, example_inputs, ctx, patches) \
            if config.compile_regions and config.lowering != "eager" else None
        if config.lowering == "eager":
            compiled = new_gm.forward
        elif by_region is not None:
            compiled, plan = by_region
            log.info("quantvla: graph %d lowered by region (AOTAutograd + Inductor) in %.2f s", ctx.graph_id,
                     time.perf_counter() - t0)
        elif not ctx.inputs.specs:
            compiled = compile_fx(new_gm, list(example_inputs), config_patches=patches)
            log.info("quantvla: graph %d lowered (AOTAutograd + Inductor) in %.2f s", ctx.graph_id, time.perf_counter() - t0)
            return compiled
        else:
            compiled = compile_fx(new_gm, list(example_inputs) + _static_fakes(ctx.inputs.values), config_patches=patches)
            log.info("quantvla: graph %d lowered (AOTAutograd + Inductor) in %.2f s", ctx.graph_id, time.perf_counter() - t0)
    provider = DerivedInputProvider(ctx.inputs.specs, verify_weights=config.verify_weights, on_built=offload)

    layers = tuple(dict.fromkeys(s.record.fqn for s in ctx.kept))

    def run(*args):
        return guard_outputs(compiled(*args, *provider(args)), args, layers)

    run.quantvla_report = ctx.report  # for tests and debugging
    run.quantvla_regions = plan  # regions.RegionPlan with compile_regions, else None
    run.quantvla_provider = provider
    return run


def _regions(gm, example_inputs, ctx, patches):
    """(callable, RegionPlan) from regions.lower_by_region, or None when the graph cannot be split."""
    tc = torch._guards.TracingContext.try_get()
    fake_mode = tc.fake_mode if tc is not None and tc.fake_mode is not None else fake_mode_of(gm)
    compiled, plan = lower_by_region(gm, list(example_inputs) + list(ctx.inputs.values), fake_mode,
                                     lambda g, args: compile_fx(g, args, config_patches=patches))
    if plan is None:
        return None
    GraphDumper(ctx.config.dump_dir, ctx.graph_id).write("regions.md", plan.table())
    ctx.report.notes.append(f"compile_regions: {len(plan.runs)} runs, {len(plan.lowered)} distinct lowerings "
                            f"({sum(plan.lowered.values()):.1f} s); each run and the lowering it reuses: "
                            f"graph_{ctx.graph_id:03d}/regions.md")
    if ctx.config.dump_dir:
        report_book(ctx.config.dump_dir).write()  # written once before the lowering; now with this note
    return compiled, plan


def _static_fakes(values: list) -> list:
    """The derived inputs as static-shaped fakes of the tracing context's fake mode.

    AOTAutograd fakifies a real input that Dynamo did not track with dynamic sizes and no
    source; a guard Inductor later puts on such a size (e.g. its 32-bit indexing check) cannot
    be expressed by Dynamo (IndexError in produce_guards, seen on torch 2.11 with full-size
    Pi0.5).  Fakes from AOT's own mode are used as they are, with static shapes.
    """
    tc = torch._guards.TracingContext.try_get()
    if tc is None or tc.fake_mode is None:
        return list(values)
    return [tc.fake_mode.from_tensor(v, static_shapes=True) for v in values]


# Loaded packs by (path, what is on disk there): re-saving to the same path is seen at the next compile.
_pack_cache: dict[tuple, Any] = {}


def _load_packs(packs):
    """Packs given as a path are loaded once per path and file state; objects are used as they are."""
    if packs is None or not isinstance(packs, (str, bytes)) and not hasattr(packs, "__fspath__"):
        return packs
    from .duquant.load import load_packs

    path = os.fspath(packs)
    key = (path, _disk_state(path))
    if key not in _pack_cache:
        for old in [k for k in _pack_cache if k[0] == path]:
            del _pack_cache[old]
        _pack_cache[key] = load_packs(path)
    return _pack_cache[key]


def _disk_state(path: str) -> tuple:
    """(name, size, mtime_ns) of the file, or of every file in the folder."""
    if not os.path.isdir(path):
        try:
            st = os.stat(path)
        except OSError:
            return ()
        return ((os.path.basename(path), st.st_size, st.st_mtime_ns),)
    return tuple(sum((_disk_state(os.path.join(path, n)) for n in sorted(os.listdir(path))), ()))
