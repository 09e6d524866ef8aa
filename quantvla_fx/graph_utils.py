"""FX helpers shared by the passes: cloning Dynamo's graph, naming call sites, fake values.

All of this follows what torch 2.13 does (see research/torch_compile_backend.md): parameters are
lifted to placeholders whose ``meta["grapharg"]`` holds the real tensor, the calling module is the
last entry of ``meta["nn_module_stack"]``, and new nodes need a FakeTensor ``example_value`` from
the fake mode of the existing nodes (not the tracing context's).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx.node import map_arg

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)

_ROOT = re.compile(r"^(?:L|G)\[['\"]([^'\"]+)['\"]\]\.?")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")
_MODULE_ACCESS = re.compile(r"\.?_modules\[['\"]([^'\"]+)['\"]\]")


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's GraphModule that may gain placeholders (Dynamo's own may not)."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    graph.output(out[0] if isinstance(out, tuple) else out)
    for old, new in val_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = dict(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm


def normalize_fqn(path: str) -> str:
    """``L['self'].model.layers[0]._modules['mlp']`` -> ``model.layers.0.mlp``;
    ``L['fn'].__self__.model…`` (a compiled bound method) -> ``model…``."""
    path = _MODULE_ACCESS.sub(lambda m: "." + m.group(1), path)
    path = _ROOT.sub("", path)
    path = _INDEX.sub(lambda m: "." + m.group(1), path)
    path = re.sub(r"\.+", ".", path).strip(".")
    # A compiled bound method (torch.compile(policy.sample_actions)) is rooted at fn.__self__.
    while path.startswith("__self__"):
        path = path[len("__self__"):].lstrip(".")
    return path


def call_site_fqn(node: fx.Node) -> Optional[str]:
    """FQN of the module whose forward called ``node`` (None outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_fqn(path)


def source_name(source: Any) -> str:
    """Source.name is a property in torch 2.13 and a method in older releases."""
    name = getattr(source, "name", None)
    return name() if callable(name) else str(name)


def param_fqn(placeholder: fx.Node) -> Optional[str]:
    """Dotted path of a lifted parameter/buffer (``model.layers.0.mlp.up_proj.weight``)."""
    grapharg = placeholder.meta.get("grapharg")
    source = getattr(grapharg, "source", None) or getattr(placeholder, "_dynamo_source", None)
    if source is None:
        return None
    return normalize_fqn(source_name(source))


def placeholder_real_tensor(placeholder: fx.Node, example_inputs: list, index: int) -> Optional[torch.Tensor]:
    example = example_inputs[index] if index < len(example_inputs) else None
    if isinstance(example, torch.Tensor) and not isinstance(example, torch._subclasses.FakeTensor):
        return example
    grapharg = placeholder.meta.get("grapharg")
    ex = getattr(grapharg, "example", None)
    return ex if isinstance(ex, torch.Tensor) else None


def fake_mode_of(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        v = node.meta.get("example_value")
        if isinstance(v, torch._subclasses.FakeTensor):
            return v.fake_mode
    raise RuntimeError("quantvla: the Dynamo graph carries no FakeTensor example values")


def linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of a linear call, whether passed positionally or by keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    w = node.kwargs.get("weight", args[1])
    b = node.kwargs.get("bias", args[2])
    return x, w, b


def last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def add_input(gm: fx.GraphModule, name: str, real: torch.Tensor, fake_mode, after: Optional[fx.Node] = None) -> fx.Node:
    """Append a trailing graph input whose example value is a static-shaped fake of ``real``.

    ``after``: the last placeholder, when the caller knows it (finding it walks the graph)."""
    with gm.graph.inserting_after(after if after is not None else last_placeholder(gm.graph)):
        node = gm.graph.placeholder(name)
    node._dynamo_source = None
    node.meta["example_value"] = fake_mode.from_tensor(real, static_shapes=True)
    node.meta["quantvla_derived"] = True
    # A static input to AOTAutograd / CUDA graphs: a replay reads the pack where it lives instead of
    # copying it into the graph's pool each call; a re-pack (new address) makes the graph re-record.
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return node


def trace_into(graph: fx.Graph, fn: Callable, *args, **kwargs):
    """Record ``fn`` applied to graph nodes as new nodes at the current insertion point.

    Returns the result with Proxies replaced by Nodes.  Callers must then give the new nodes
    example values with :func:`propagate_fake`.
    """
    tracer = fx.proxy.GraphAppendingTracer(graph)
    wrap = lambda a: fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a  # noqa: E731
    out = fn(*[wrap(a) for a in args], **{k: wrap(v) for k, v in kwargs.items()})
    return torch.utils._pytree.tree_map(lambda p: p.node if isinstance(p, fx.Proxy) else p, out)


def propagate_fake(gm: fx.GraphModule, fake_mode, nodes: Optional[Iterable[fx.Node]] = None) -> None:
    """Compute a FakeTensor ``example_value`` for every node that lacks one (in graph order)."""
    for node in nodes if nodes is not None else gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or "example_value" in node.meta:
            continue
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta["example_value"])
        with fake_mode:
            if node.op == "call_function":
                val = node.target(*args, **kwargs)
            else:
                val = getattr(args[0], node.target)(*args[1:], **kwargs)
        node.meta["example_value"] = val


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm
