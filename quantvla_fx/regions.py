"""Regional lowering: compile each distinct repeated layer once (``compile_regions=True``).

Pi0.5's ``sample_actions`` is one unrolled graph: 27 SigLIP layers, 18 LM layers, 10 denoise steps
x 18 expert layers. After our rewrite every layer's weights, packs and hoisted values are graph
inputs, so the layer instances of one stack are the same computation on inputs of the same
shapes. Here the rewritten graph is cut into runs of nodes by the layer that called them
(``...layers.<i>``), each run becomes a submodule, and the submodules are keyed by their
structure (op, target, constants, how nodes connect) and the shape/stride/dtype/device of their
inputs. Each distinct key is lowered by Inductor once; every run with that key calls the same
compiled function. The glue between layers (embeddings, the denoise update, ...) is lowered as
runs of its own.

What it costs: no fusion across a cut (a layer's output is written once to memory), and one
Python call per run at run time. With CUDA graphs each run is recorded as a graph of its own in
Inductor's CUDA-graph tree (not yet measured on a GPU).
The caller lowers the graph whole (logged) when an input has a symbolic shape.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from .graph_utils import call_site_fqn

log = logging.getLogger("quantvla_fx")

_LAYER = re.compile(r"^((?:.*?\.)?layers\.\d+)(?:\.|$)")  # the outermost ``layers.<i>``


@dataclass
class RegionPlan:
    """What the split found: one entry per run, in graph order."""

    runs: list[tuple[str, str, int]] = field(default_factory=list)  # (submodule, region or 'glue', nodes)
    keys: dict[str, str] = field(default_factory=dict)  # submodule -> structural key
    lowered: dict[str, float] = field(default_factory=dict)  # key -> seconds of its one lowering

    def table(self) -> str:
        """Markdown for the dumps: every run, its key and whether it reused an earlier lowering."""
        first: dict[str, str] = {}
        lines = ["| run | region | nodes | key | lowering |", "|---|---|---|---|---|"]
        for name, region, n in self.runs:
            key = self.keys[name]
            reuse = first.setdefault(key, name)
            how = f"{self.lowered[key]:.2f} s" if reuse == name else f"reuses {reuse}"
            lines.append(f"| {name} | {region} | {n} | {key[:10]} | {how} |")
        distinct = len(set(self.keys.values()))
        lines.append("")
        lines.append(f"{len(self.runs)} runs, {distinct} distinct lowerings, "
                     f"{sum(self.lowered.values()):.2f} s lowering in all")
        return "\n".join(lines) + "\n"


def region_of(node: fx.Node) -> Optional[str]:
    """The ``...layers.<i>`` module that called ``node``, or None outside any layer."""
    fqn = call_site_fqn(node)
    m = _LAYER.match(fqn) if fqn else None
    return m.group(1) if m else None


def _partition(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], dict[int, str]]:
    """Run ids for the compute nodes: a new run whenever the calling layer changes. A node no
    module called (getitem, an inserted op without a module stack) stays in the current run."""
    part: dict[fx.Node, int] = {}
    names: dict[int, str] = {}
    current, run = "\0", -1
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        region = region_of(node)
        if region is None and node.meta.get("nn_module_stack") is None and run >= 0:
            region = current  # no module information: belongs where it was written
        region = region or "glue"
        if region != current:
            run += 1
            current = region
            names[run] = region
        part[node] = run
    return part, names


def _structure_key(sub: fx.GraphModule, example_args: list) -> str:
    """Equal keys: the same computation on inputs of the same metadata (names do not matter)."""
    index: dict[fx.Node, int] = {}
    parts: list[str] = []

    def ref(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return type(a).__name__ + "(" + ",".join(ref(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{ref(v)}" for k, v in a.items()) + "}"
        if isinstance(a, torch.Tensor):  # a constant inlined as an argument: its identity matters
            return f"tensor@{id(a)}"
        return repr(a)

    for i, node in enumerate(sub.graph.nodes):
        index[node] = i
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", None) or str(node.target)
        module = getattr(node.target, "__module__", "") if not isinstance(node.target, str) else ""
        if node.op == "placeholder":  # its name is the outer node's: only position and static mark count
            target = str(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))
        elif node.op == "output":
            target = ""
        elif node.op == "get_attr":
            target = f"{node.target}@{id(getattr(sub, node.target, None))}"  # constants are per piece
        parts.append(f"{node.op} {module}.{target} {ref(node.args)} {ref(node.kwargs)}")
    for a in example_args:
        if isinstance(a, torch.Tensor):
            parts.append(f"in {tuple(a.shape)} {a.stride()} {a.dtype} {a.device} {a.requires_grad}")
        else:
            parts.append(f"in {type(a).__name__} {a!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _fakes(values: list, fake_mode) -> Optional[list]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            f = v if isinstance(v, torch._subclasses.FakeTensor) else fake_mode.from_tensor(v, static_shapes=True)
            if any(not isinstance(s, int) for s in (*f.shape, *f.stride())):
                return None
            out.append(f)
        elif isinstance(v, torch.SymInt):
            return None
        else:
            out.append(v)
    return out


def _carry_dynamo_metadata(split: fx.GraphModule, gm: fx.GraphModule) -> int:
    """Give each submodule what AOTAutograd reads from a Dynamo graph (its compile id, every
    placeholder's source, the static-input marks), so weights, packs and hoisted values stay
    static inputs of every run: a CUDA-graph replay then reads them where they live instead of
    copying them into the graph's pool. Returns how many submodules could not get it."""
    originals = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    sources = getattr(gm, "_param_name_to_source", None)
    missing = 0
    for call in (n for n in split.graph.nodes if n.op == "call_module"):
        sub = getattr(split, call.target)
        names = [k for k, _ in sub.named_parameters(remove_duplicate=False)] + \
                [k for k, _ in sub.named_buffers(remove_duplicate=False)]
        if "dynamo_compile_id" not in gm.meta or sources is None or any(k not in sources for k in names):
            missing += 1
            continue
        sub.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
        sub._param_name_to_source = {k: sources[k] for k in names}
        for ph, outer in zip((n for n in sub.graph.nodes if n.op == "placeholder"), call.args):
            orig = originals.get(outer.name) if isinstance(outer, fx.Node) and outer.op == "placeholder" else None
            ph._dynamo_source = getattr(orig, "_dynamo_source", None)
            if orig is not None and "tensor_dict" in orig.meta:
                ph.meta["tensor_dict"] = dict(orig.meta["tensor_dict"])
    return missing


class _Compiled(torch.nn.Module):
    """A lowered run standing in for its submodule in the split graph."""

    def __init__(self, fn: Callable, single: bool):
        super().__init__()
        self.fn = fn
        self.single = single  # the submodule returns one value, Inductor's lowering a sequence

    def forward(self, *args):
        out = self.fn(*args)
        return out[0] if self.single and isinstance(out, (list, tuple)) else out


def lower_by_region(gm: fx.GraphModule, example_inputs: list, fake_mode, lower: Callable) -> tuple[Callable, Optional[RegionPlan]]:
    """Split ``gm`` into runs by calling layer and lower each distinct run once with ``lower``
    (``(gm, fake_args) -> callable``). Returns (callable over gm's inputs, plan), or (None, None)
    when the graph cannot be split (the caller lowers it whole)."""
    fake_inputs = _fakes(list(example_inputs), fake_mode)
    if fake_inputs is None:
        log.info("quantvla: compile_regions: an input has a symbolic shape; lowering the graph whole")
        return None, None
    part, names = _partition(gm)
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    missing = _carry_dynamo_metadata(split, gm)
    if missing:
        log.info("quantvla: compile_regions: %d runs carry no Dynamo metadata; their inputs are not static "
                 "for CUDA graphs", missing)
    plan = RegionPlan()
    by_key: dict[str, Callable] = {}
    single: dict[str, bool] = {}
    subs = {n.target: n for n in split.graph.nodes if n.op == "call_module"}

    class _Lower(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            sub = self.fetch_attr(target)
            key = _structure_key(sub, list(args))
            plan.keys[target] = key
            idx = int(target.rsplit("_", 1)[1])
            plan.runs.append((target, names[idx], sum(1 for n in sub.graph.nodes if n.op not in ("placeholder", "output"))))
            out = next(n for n in sub.graph.nodes if n.op == "output")
            single[target] = not isinstance(out.args[0], (tuple, list))
            with fake_mode:
                result = sub(*args, **kwargs)  # outputs as fakes, for the next runs' inputs
            if key not in by_key:  # (the lowering may rewrite sub's output into a tuple: after the run)
                t0 = time.perf_counter()
                by_key[key] = lower(sub, list(args))
                plan.lowered[key] = time.perf_counter() - t0
            return result

    _Lower(split).run(*fake_inputs)
    for target in subs:
        setattr(split, target, _Compiled(by_key[plan.keys[target]], single[target]))
    log.info("quantvla: compile_regions: %d runs, %d distinct lowerings (%.2f s)", len(plan.runs), len(by_key),
             sum(plan.lowered.values()))
    return split, plan
