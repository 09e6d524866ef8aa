"""The inputs of one graph being rewritten: Dynamo's own, and the weight-derived ones passes add.

A pass never puts a tensor into the graph: what it computes from weights (packed int4, folded
norm weights, transform matrices) becomes a trailing placeholder, registered here with the
recipe that recomputes it when the weight changes (see derived_inputs.py).
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch
import torch.fx as fx

from .derived_inputs import PACK_CACHE, DerivedInput
from .graph_utils import add_input


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
        self._names: set[str] = {n.name for n in gm.graph.nodes}

    def position(self, node) -> Optional[int]:
        """Index of one of Dynamo's placeholders among the graph inputs (None otherwise)."""
        return self._position.get(node) if isinstance(node, fx.Node) else None

    def tensor(self, node) -> Optional[torch.Tensor]:
        """The compile-time tensor of one of Dynamo's inputs (None for anything else)."""
        pos = self.position(node)
        value = self.example[pos] if pos is not None else None
        return value if isinstance(value, torch.Tensor) else None

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
        values = PACK_CACHE.get(spec, [self.example[i] for i in sources], check_content=True)
        if len(values) != len(names):
            raise RuntimeError(f"quantvla: derived input {names} produced {len(values)} tensors")
        self.specs.append(spec)
        self.values.extend(values)
        nodes = [add_input(self.gm, n, v, self.fake_mode) for n, v in zip(spec.names, values)]
        self.real.update(zip(nodes, values))
        self._memo[(key, sources)] = nodes
        return nodes

    def _unique(self, name: str) -> str:
        base, i = name, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name
