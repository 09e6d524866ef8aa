"""Subgraphs that read only weights and constants are computed once, as derived inputs.

A node is *weight-only* when every input is a module parameter/buffer (or a derived input), a
constant, or another weight-only node, and it is pure (not random, not in place, no grad).  In
Pi0.5 that is the time embedding -> time MLP -> every adaRMS ``dense`` of every step and layer:
their input is the fixed timestep schedule.  The weight-only values read by the rest of the
graph (the *outputs*) are computed by one recipe from the weights into one flat buffer per
dtype; each output is a graph input of its own, a view of that buffer (one input per output keeps
the kernels of repeated layers identical, see _rewire).  Like packed weights, the buffer is recomputed
whenever one of its weights changes (derived_inputs.py), so hoisting never bakes a value in.

An output is hoisted only if computing it costs something and keeping it costs little:
* its subgraph contains compute (not only views, casts, copies or factory calls: a transposed
  or cast copy of a weight is left to the graph, where it costs nothing or fuses), and
* it is at most ``MAX_WEIGHT_FRACTION`` of the bytes of the weights it reads (elementwise
  functions of a weight, such as Gemma's ``1 + w``, stay in the graph and fuse), or at most
  ``MAX_CONSTANT_BYTES`` when it reads no weight.
Otherwise it stays in the graph and its inputs are tried instead.

Two stages: ``find_weight_only`` (an analysis, before group_inputs) decides what is hoisted and
takes the selected linears inside it out of quantization: hoisting computes them exactly, in
their own dtype, once per weight change, which beats any W4A8 kernel at runtime; the report says
"hoisted".  ``hoist_weight_only`` (the last pass: folds into e.g. adaRMS ``dense`` rows are applied
first and become part of the recipe, and every pass before it sees the subgraphs as written)
rewrites the graph.
"""
from __future__ import annotations

import hashlib
import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from quantvla_fx.graph_utils import LINEAR_TARGETS
from quantvla_fx.rewrite_context import RewriteContext

log = logging.getLogger("quantvla_fx")

MAX_WEIGHT_FRACTION = 0.5
MAX_CONSTANT_BYTES = 1 << 20
_ALIGN_BYTES = 64  # each view starts on a 64-byte boundary of its buffer (vector loads)

# Ops that only view, cast, copy or create data: a cone of these alone computes nothing.
_NO_COMPUTE_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "t", "transpose", "permute", "expand", "expand_as", "unsqueeze",
    "squeeze", "flatten", "unflatten", "contiguous", "clone", "detach", "to", "type", "type_as", "float", "half",
    "bfloat16", "double", "int", "long", "bool", "narrow", "chunk", "split", "unbind", "select", "movedim",
    "swapaxes", "repeat", "repeat_interleave", "tile", "broadcast_to", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_tensor", "__getitem__",
})
_NO_COMPUTE_FUNCTIONS = frozenset({
    "getitem", "reshape", "transpose", "permute", "t", "narrow", "chunk", "split", "unbind", "select", "squeeze",
    "unsqueeze", "flatten", "unflatten", "movedim", "swapaxes", "cat", "concat", "concatenate", "stack", "hstack",
    "vstack", "repeat_interleave", "tile", "broadcast_to", "clone", "detach", "contiguous", "tensor", "as_tensor",
    "zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "arange", "linspace", "logspace",
    "eye", "scalar_tensor",
})
# Random or uninitialised results: never computed once for all calls.
_RANDOM = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "rrelu", "native_dropout", "empty", "empty_like", "empty_strided", "new_empty",
    "uniform", "exponential", "geometric", "cauchy", "log_normal", "gumbel_softmax",
})
_INPLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                                operator.ixor, operator.ilshift, operator.irshift, operator.imatmul})


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", None) or str(node.target).rsplit(".", 1)[-1]


_INPLACE_DUNDERS = frozenset(f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                                                      "or", "xor", "lshift", "rshift", "matmul")) | {"__setitem__"}


def _mutates(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("out") is not None or node.kwargs.get("inplace"):
        return True
    if node.op == "call_method" and node.target in _INPLACE_DUNDERS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = _name(node)
    return name.endswith("_") and not name.endswith("__")


def _is_view(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and _name(node) in (_NO_COMPUTE_METHODS | {"getitem"}) - {
        "clone", "contiguous", "to", "repeat", "repeat_interleave", "tile"}


def _pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or _mutates(node):
        return False
    tags = getattr(node.target, "tags", ())
    return _name(node) not in _RANDOM and torch.Tag.nondeterministic_seeded not in tags


def _tensors(value) -> Optional[list[torch.Tensor]]:
    """The tensors of a node's value if it is a tensor or a tuple/list of them, else None."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class HoistPlan:
    outputs: list[fx.Node] = field(default_factory=list)  # weight-only values the rest of the graph reads
    nodes: list[fx.Node] = field(default_factory=list)  # what computes them (graph order), outputs included
    leaves: list[fx.Node] = field(default_factory=list)  # the placeholders they read
    removed: set[fx.Node] = field(default_factory=set)  # nodes no longer computed at runtime
    weight_only: set[fx.Node] = field(default_factory=set)  # every weight-only node (pure: dead ones may go)

    @property
    def linears(self) -> list[fx.Node]:
        return [n for n in self.nodes if n in self.removed and n.target in LINEAR_TARGETS]


def _pinned(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that must stay in the graph: values written in place there and what they view, and
    whatever runs inside an autocast region (re-run outside it, its dtypes would differ)."""
    forced: set[fx.Node] = set()
    depth = 0
    for n in graph.nodes:
        name = _name(n) if n.op in ("call_function", "call_method") else ""
        depth += (name == "_enter_autocast") - (name == "_exit_autocast")
        if depth > 0:
            forced.add(n)
        if _mutates(n) and n.args:
            x = n.args[0]
            while isinstance(x, fx.Node) and x not in forced:
                forced.add(x)
                x = x.args[0] if _is_view(x) and x.args else None
    return forced


def _weight_only(graph: fx.Graph, inputs, forced: set[fx.Node]) -> set[fx.Node]:
    w: set[fx.Node] = set()
    for n in graph.nodes:
        if n in forced:
            continue
        if n.op == "placeholder":
            if inputs.is_weight(n):
                w.add(n)
            continue
        if not _pure(n) or not all(a in w for a in n.all_input_nodes):
            continue
        ts = _tensors(n.meta.get("example_value"))
        if ts is None or any(t.requires_grad for t in ts):  # hoisted values carry no autograd history
            continue
        w.add(n)
    return w


def _cone(node: fx.Node, w: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(computing nodes, placeholders) that ``node`` is computed from, within ``w``."""
    nodes, leaves, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in nodes or n in leaves:
            continue
        if n.op == "placeholder":
            leaves.add(n)
            continue
        nodes.add(n)
        stack.extend(a for a in n.all_input_nodes if a in w)
    return nodes, leaves


def _worth_hoisting(node: fx.Node, w: set[fx.Node]) -> bool:
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or any(u.op == "output" for u in node.users):
        return False  # a graph output must not alias the cached buffer
    nodes, leaves = _cone(node, w)
    if all(_name(n) in _NO_COMPUTE_METHODS or _name(n) in _NO_COMPUTE_FUNCTIONS for n in nodes):
        return False
    weight_bytes = sum(_nbytes(v) for v in (lf.meta.get("example_value") for lf in leaves) if isinstance(v, torch.Tensor))
    if weight_bytes == 0:
        return _nbytes(value) <= MAX_CONSTANT_BYTES
    return _nbytes(value) <= MAX_WEIGHT_FRACTION * weight_bytes


def plan_hoist(graph: fx.Graph, inputs, forced: set[fx.Node] = frozenset()) -> HoistPlan:
    """Which weight-only values to compute once, and the nodes that then leave the graph."""
    forced = set(forced) | _pinned(graph)
    w = _weight_only(graph, inputs, forced)
    runtime: set[fx.Node] = set()

    def read_at_runtime(n):
        return any(u not in w or u in runtime or u.op == "output" for u in n.users)

    order = {n: i for i, n in enumerate(graph.nodes)}
    work = [n for n in graph.nodes if n in w and n.op != "placeholder" and read_at_runtime(n)]
    outputs: set[fx.Node] = set()
    while work:
        n = work.pop()
        if n in outputs or n in runtime:
            continue
        if _worth_hoisting(n, w):
            outputs.add(n)
            continue
        runtime.add(n)  # it stays in the graph: what it reads is now read at runtime
        work.extend(a for a in n.all_input_nodes if a in w and a.op != "placeholder")
    plan = HoistPlan(outputs=sorted(outputs, key=order.get))
    nodes: set[fx.Node] = set()
    leaves: set[fx.Node] = set()
    for o in plan.outputs:
        c, lf = _cone(o, w)
        nodes |= c
        leaves |= lf
    plan.nodes = sorted(nodes, key=order.get)
    plan.leaves = sorted(leaves, key=order.get)
    plan.removed = nodes - runtime
    plan.weight_only = w
    return plan


# -- the analysis ------------------------------------------------------------------------------
def find_weight_only(gm: fx.GraphModule, ctx: RewriteContext) -> None:
    """Decide what is hoisted; selected linears inside it are computed exactly instead of quantized."""
    forced: set[fx.Node] = set()
    while True:  # a selected linear that stays at runtime stays quantized: it cannot be part of a hoist
        plan = plan_hoist(gm.graph, ctx.inputs, forced)
        in_plan = set(plan.nodes)
        stay = {s.node for s in ctx.kept if s.node in in_plan and s.node not in plan.removed} - forced
        if not stay:
            break
        forced |= stay
    ctx.hoisted = set(plan.removed)
    for s in ctx.kept:
        if s.node in ctx.hoisted:
            s.record.quantized = False
            s.record.reason = ("hoisted: reads only weights and constants, so it is computed once per weight "
                               f"change, exactly, in {s.record.dtype} (was {s.record.reason})")


# -- the pass ----------------------------------------------------------------------------------
class HoistedRecipe:
    """weights -> every hoisted output, as views of one flat buffer per dtype (a derived input's compute).

    ``leaves`` says where each input of the subgraph comes from: ("input", i) the i-th source, or
    ("derived", spec, k, idx) output k of a derived input ``spec`` whose sources are ``idx``.
    """

    def __init__(self, module: fx.GraphModule, leaves: list, layout: list, key):
        self.module, self.leaves, self.layout, self.key = module, leaves, layout, key

    def outputs(self, *sources: torch.Tensor) -> list[torch.Tensor]:
        computed: dict[int, tuple] = {}
        args = []
        for leaf in self.leaves:
            if leaf[0] == "input":
                args.append(sources[leaf[1]])
                continue
            _, spec, k, idx = leaf
            if id(spec) not in computed:
                computed[id(spec)] = tuple(spec.compute(*[sources[i] for i in idx]))
            args.append(computed[id(spec)][k])
        with torch.no_grad():
            return list(self.module(*args))

    def __call__(self, *sources: torch.Tensor):
        """One view per output (in output order), all views of one flat buffer per dtype."""
        outs = self.outputs(*sources)
        views: list = [None] * len(outs)
        for dtype, device, size, entries in self.layout:
            flat = torch.zeros(size, dtype=dtype, device=device)
            for j, offset in entries:
                view = flat[offset:offset + outs[j].numel()].view(outs[j].shape)
                view.copy_(outs[j])
                views[j] = view
        return tuple(views)


def _layout(outputs: list[fx.Node]) -> list:
    """Per (dtype, device): buffer size and each output's offset, aligned."""
    by: dict[tuple, list] = {}
    for j, o in enumerate(outputs):
        v = o.meta["example_value"]
        by.setdefault((v.dtype, v.device), []).append((j, v.numel()))
    layout = []
    for (dtype, device), items in by.items():
        align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offset, entries = 0, []
        for j, numel in items:
            entries.append((j, offset))
            offset += -(-numel // align) * align
        layout.append((dtype, device, max(offset, 1), entries))
    return layout


def _subgraph(plan: HoistPlan) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, leaf in enumerate(plan.leaves):
        env[leaf] = graph.placeholder(f"leaf_{i}")
    for n in plan.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in plan.outputs))
    return fx.GraphModule(torch.nn.Module(), graph)


def hoist_weight_only(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    kept = {s.node for s in ctx.kept}
    plan = plan_hoist(gm.graph, ctx.inputs, kept)
    missed = {n.name for n in ctx.hoisted - plan.removed}
    for rec in ctx.report.linears:  # a pass between the two stages changed the graph: say what really happened
        if rec.node in missed and rec.reason.startswith("hoisted"):
            rec.reason = "not quantized: weight-only, planned for hoisting but left in the graph in float"
    if not plan.outputs:
        return gm
    module = _subgraph(plan)
    sources: dict[int, int] = {}  # graph input position -> its index among the recipe's sources

    def source(pos: int) -> int:
        return sources.setdefault(pos, len(sources))

    leaves, leaf_keys = [], []
    for leaf in plan.leaves:
        if leaf in ctx.inputs.origin:
            spec, k = ctx.inputs.origin[leaf]
            leaves.append(("derived", spec, k, tuple(source(p) for p in spec.sources)))
            leaf_keys.append(("derived", spec.key, k))
        else:
            leaves.append(("input", source(ctx.inputs.position(leaf))))
            leaf_keys.append(("input",))
    layout = _layout(plan.outputs)
    digest = hashlib.sha1(repr((module.code, _described(leaves), layout)).encode()).hexdigest()
    recipe = HoistedRecipe(module, leaves, layout, ("hoist-weight-only", digest, tuple(leaf_keys)))
    why = _mismatch(ctx, plan, module)
    if why:
        _give_up(ctx, plan, why)
        return gm
    names = tuple(f"qv_hoisted_{o.name}" for o in plan.outputs)
    views = ctx.inputs.add_derived(names, tuple(sources), recipe, recipe.key)
    _rewire(ctx, plan, views)
    _report(ctx, plan, layout)
    return gm


def _described(leaves: list) -> list:
    """The leaves without their spec objects (their keys go into the recipe key separately)."""
    return [(lf[0], lf[2], lf[3]) if lf[0] == "derived" else lf for lf in leaves]


def _mismatch(ctx: RewriteContext, plan: HoistPlan, module: fx.GraphModule) -> Optional[str]:
    """Why the subgraph, run on the compile-time weights, does not give the graph's values (None: it does)."""
    args = [ctx.inputs.real[lf] if lf in ctx.inputs.origin else ctx.inputs.tensor(lf) for lf in plan.leaves]
    if any(a is None for a in args):
        return "a weight's compile-time tensor is not known"
    try:
        with torch.no_grad():
            outs = module(*args)
    except Exception as e:  # noqa: BLE001 (reported, and the graph is left as it is)
        return f"running it failed: {type(e).__name__}: {e}"
    for o, out in zip(plan.outputs, outs):
        v = o.meta["example_value"]
        if not isinstance(out, torch.Tensor) or (out.dtype, out.device, tuple(out.shape)) != (v.dtype, v.device, tuple(v.shape)):
            got = (out.dtype, out.device, tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"{o.name} computes {got}, the graph expects {(v.dtype, v.device, tuple(v.shape))}"
    return None


def _give_up(ctx: RewriteContext, plan: HoistPlan, why: str) -> None:
    """Leave the graph as it is; linears planned for hoisting run in float (exact) at runtime."""
    ctx.report.warn(f"graph {ctx.graph_id}: weight-only subgraph not hoisted ({why}); it runs in the graph")
    names = {n.name for n in ctx.hoisted}
    for rec in ctx.report.linears:
        if rec.node in names and rec.reason.startswith("hoisted"):
            rec.reason = "not quantized: weight-only, planned for hoisting, left in the graph in float (see notes)"


def _rewire(ctx: RewriteContext, plan: HoistPlan, views) -> None:
    """Each hoisted output becomes a graph input of its own (a view of its dtype's flat buffer).

    Not one buffer input read at offsets: Inductor bakes a view's offset into the kernel that reads
    it, so every layer and denoise step would get a kernel of its own (hundreds in Pi0.5) instead
    of sharing one compiled kernel; separate inputs keep the kernels of repeated blocks identical.
    """
    graph = ctx.gm.graph
    for o, view in zip(plan.outputs, views):
        o.replace_all_uses_with(view)
    for n in reversed(list(graph.nodes)):  # the hoisted nodes, and dead weight-only ones that kept them alive
        if n in plan.weight_only and n.op != "placeholder" and not n.users:
            graph.erase_node(n)
    ctx.inputs.drop_unused()


def _report(ctx: RewriteContext, plan: HoistPlan, layout) -> None:
    by_node = {r.node: r for r in ctx.report.linears}
    for n in plan.linears:
        rec = by_node.get(n.name)
        if rec is not None:
            rec.op = "hoisted: computed once per weight change (derived input)"
    nbytes = sum(size * torch.empty((), dtype=dtype).element_size() for dtype, _, size, _ in layout)
    compute = [n for n in plan.nodes if n in plan.removed
               and _name(n) not in _NO_COMPUTE_METHODS and _name(n) not in _NO_COMPUTE_FUNCTIONS]
    ctx.report.hoisted.append({
        "nodes": len(plan.removed), "compute_ops": len(compute), "linears": len(plan.linears),
        "outputs": len(plan.outputs), "bytes": int(nbytes),
        "weights": len([lf for lf in plan.leaves if lf not in ctx.inputs.origin]),
        "buffers": [f"{str(dtype).replace('torch.', '')}[{size}]" for dtype, _, size, _ in layout],
    })
    log.info("quantvla: graph %d: hoisted %d weight-only nodes (%d compute ops, %d linears) into %d bytes",
             ctx.graph_id, len(plan.removed), len(compute), len(plan.linears), nbytes)
