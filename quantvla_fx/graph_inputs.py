"""The inputs of one graph being rewritten: Dynamo's own, and the weight-derived ones passes add.

A pass never puts a tensor into the graph: what it computes from weights (packed int4, folded
norm weights, transform matrices) becomes a trailing placeholder, registered here with the
recipe that recomputes it when the weight changes (see derived_inputs.py).
"""
from __future__ import annotations

import re
import time
from typing import Hashable, Optional

import torch
import torch.fx as fx

from .derived_inputs import PACK_CACHE, DerivedInput
from .graph_utils import add_input, source_name

# How Dynamo names a module's parameter or buffer lifted to a graph input (inlined nn modules).
_PARAM_OR_BUFFER = re.compile(r"\._(parameters|buffers)\[")


class GraphInputs:
    def __init__(self, gm: fx.GraphModule, example_inputs: list, fake_mode):
        self.gm = gm
        self.example = list(example_inputs)  # Dynamo's inputs, real tensors at compile time
        self.fake_mode = fake_mode
        self.specs: list[DerivedInput] = []  # derived inputs, in placeholder order
        self.values: list[torch.Tensor] = []  # their compile-time values, flattened
        self.real: dict[fx.Node, torch.Tensor] = {}  # derived placeholder -> its compile-time value
        self._position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self._memo: dict[tuple, list[fx.Node]] = {}
        self.origin: dict[fx.Node, tuple[DerivedInput, int]] = {}  # derived placeholder -> (its spec, output index)
        self._names: set[str] = {n.name for n in gm.graph.nodes}
        self.derive_s = 0.0  # wall time spent computing derived inputs (packing) at this compile
        self._last: Optional[fx.Node] = None  # the last placeholder added (saves a walk of the graph per input)

    def position(self, node) -> Optional[int]:
        """Index of one of Dynamo's placeholders among the graph inputs (None otherwise)."""
        return self._position.get(node) if isinstance(node, fx.Node) else None

    def tensor(self, node) -> Optional[torch.Tensor]:
        """The compile-time tensor of one of Dynamo's inputs (None for anything else)."""
        pos = self.position(node)
        value = self.example[pos] if pos is not None else None
        return value if isinstance(value, torch.Tensor) else None

    def is_weight(self, node) -> bool:
        """Whether a placeholder holds a module's parameter or buffer, or is derived from them.

        Those are the inputs a derived input may be computed from: they are the same tensors call
        after call, and the provider re-derives when one changes (its version, storage or identity).
        """
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return False
        if node in self.origin:
            return True
        if isinstance(self.tensor(node), torch.nn.Parameter):
            return True
        source = getattr(node, "_dynamo_source", None)
        if source is None:
            source = getattr(node.meta.get("grapharg"), "source", None)
        if source is None:
            return False
        from torch._dynamo.source import ParamBufferSource, UnspecializedParamBufferSource

        return isinstance(source, (ParamBufferSource, UnspecializedParamBufferSource)) or bool(
            _PARAM_OR_BUFFER.search(source_name(source)))

    def add_derived(self, names: tuple[str, ...], sources: tuple[int, ...], compute, key: Hashable) -> list[fx.Node]:
        """Register weight-derived inputs and return their placeholder nodes.

        The same recipe on the same sources (a weight used at several call sites, e.g. the
        unrolled denoise steps) gets one set of placeholders, computed once per call.
        """
        memo = self._memo.get((key, sources))
        if memo is not None:
            return memo
        spec = DerivedInput(tuple(self._unique(n) for n in names), sources, compute, key)
        # check_content: every compile packs from the current values, even after a `.data` edit.
        t0 = time.perf_counter()
        values = PACK_CACHE.get(spec, [self.example[i] for i in sources], check_content=True)
        self.derive_s += time.perf_counter() - t0
        if len(values) != len(names):
            raise RuntimeError(f"quantvla: derived input {names} produced {len(values)} tensors")
        self.specs.append(spec)
        self.values.extend(values)
        nodes = []
        for n, v in zip(spec.names, values):
            nodes.append(add_input(self.gm, n, v, self.fake_mode, after=self._last_placeholder()))
            self._last = nodes[-1]
        self.real.update(zip(nodes, values))
        self.origin.update((n, (spec, i)) for i, n in enumerate(nodes))
        self._memo[(key, sources)] = nodes
        return nodes

    def drop_unused(self) -> int:
        """Remove the derived inputs that no node reads any more (e.g. read only by a hoisted
        subgraph); returns how many placeholders went."""
        keep, values, dropped, gone = [], [], 0, set()
        nodes_of: dict[int, list[fx.Node]] = {}
        for n, (s, _) in self.origin.items():
            nodes_of.setdefault(id(s), []).append(n)
        for spec in self.specs:
            nodes = nodes_of.get(id(spec), [])
            if any(n.users for n in nodes):
                keep.append(spec)
                values.extend(self.real[n] for n in sorted(nodes, key=lambda n: self.origin[n][1]))
                continue
            for n in nodes:
                self.gm.graph.erase_node(n)
                del self.origin[n], self.real[n]
                gone.add(n)
                dropped += 1
        if gone:
            self._memo = {k: v for k, v in self._memo.items() if v[0] not in gone}
        self.specs, self.values = keep, values
        return dropped

    def _last_placeholder(self) -> Optional[fx.Node]:
        """The graph's last placeholder if the one remembered still is (None: let add_input look)."""
        last = self._last
        if last is None or last._erased or last.graph is not self.gm.graph or last.next.op == "placeholder":
            return None
        return last

    def _unique(self, name: str) -> str:
        base, i = name, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name
