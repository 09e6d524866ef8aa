"""State the passes share while rewriting one Dynamo graph (no pass keeps state of its own)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from .config import QuantVLAConfig
from .derived_inputs import PACK_CACHE, DerivedInput
from .graph_utils import add_input
from .report import GraphReport, LinearRecord


@dataclass(eq=False)
class LinearSite:
    node: fx.Node
    record: LinearRecord
    input_node: fx.Node
    weight_pos: int  # position of the weight among the graph inputs
    weight: torch.Tensor  # the real parameter seen at compile time
    bias: Any  # bias node or None
    pack: Any = None  # DuQuant LayerPack or None
    group: Optional["GroupSite"] = None
    row_div: Optional[torch.Tensor] = None  # [N] divisor of the output rows (folded smoothing)
    w_packed: Optional[fx.Node] = None
    w_scale: Optional[fx.Node] = None


@dataclass(eq=False)
class GroupSite:
    """Linears reading one activation: one transform, one quantization, several GEMMs."""

    name: str
    input_node: fx.Node
    members: list[LinearSite] = field(default_factory=list)
    transform: Any = None  # DuQuantTransform or None (round-to-nearest)
    # Set by fold_duquant: builds the online activation transform from the group input node.
    online: Optional[Callable[[Any], Any]] = None


class RewriteContext:
    def __init__(self, gm: fx.GraphModule, example_inputs: list, config: QuantVLAConfig, graph_id: int, fake_mode, packs=None):
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self.config = config
        self.graph_id = graph_id
        self.fake_mode = fake_mode
        self.packs = packs
        self.report = GraphReport(graph_id)
        self.sites: list[LinearSite] = []
        self.groups: list[GroupSite] = []
        self.derived: list[DerivedInput] = []
        self.derived_values: list[torch.Tensor] = []
        self.derived_real: dict[fx.Node, torch.Tensor] = {}  # placeholder -> its compile-time value
        self._derived_nodes: dict[tuple, list[fx.Node]] = {}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._position = {n: i for i, n in enumerate(self.placeholders)}
        self._names: set[str] = {n.name for n in gm.graph.nodes}

    @property
    def kept(self) -> list[LinearSite]:
        return [s for s in self.sites if s.record.quantized]

    def input_position(self, node: fx.Node) -> Optional[int]:
        return self._position.get(node)

    def add_derived(self, names: tuple[str, ...], sources: tuple[int, ...], compute, key) -> list[fx.Node]:
        """Register weight-derived inputs and return their placeholder nodes.

        The same recipe on the same sources (a weight used at several call sites, e.g. the
        unrolled denoise steps) gets one set of placeholders, computed once per call.
        """
        memo = self._derived_nodes.get((key, sources))
        if memo is not None:
            return memo
        spec = DerivedInput(tuple(self._unique(n) for n in names), sources, compute, key)
        # check_content: every compile packs from the current values, even after a `.data` edit.
        values = PACK_CACHE.get(spec, [self.example_inputs[i] for i in sources], check_content=True)
        if len(values) != len(names):
            raise RuntimeError(f"quantvla: derived input {names} produced {len(values)} tensors")
        self.derived.append(spec)
        self.derived_values.extend(values)
        nodes = [add_input(self.gm, n, v, self.fake_mode) for n, v in zip(spec.names, values)]
        self.derived_real.update(zip(nodes, values))
        self._derived_nodes[(key, sources)] = nodes
        return nodes

    def _unique(self, name: str) -> str:
        base, i = name, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name
