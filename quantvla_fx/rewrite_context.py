"""What the rewrite stages hand each other for one Dynamo graph (no pass keeps state of its own).

Each stage fills its own typed slot; later stages read it and never write it:
  match_linears    -> ctx.sites    one LinearSite per selected linear
  find_weight_only -> ctx.hoisted  nodes of weights and constants only, computed once
                                   (hoist_weight_only; the selected linears among them are unselected)
  group_inputs     -> ctx.groups   one GroupSite per activation that linears read
  fold_duquant     -> ctx.duquant  DuQuantPlan: per transform group its OnlineTransform,
                                   per linear its LinearFold (weight side, row divisor, output rotation)
  quantize_weights -> ctx.weights  per linear its PackedWeight (derived-input placeholders; a
                                   group's linears share one stacked pack)
  substitute_ops   reads them all and rewrites the graph.
  hoist_weight_only (last) computes ctx.hoisted once, as derived inputs, and removes it.
Graph inputs, original and derived, are ctx.inputs (graph_inputs.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.fx as fx

from .config import QuantVLAConfig
from .duquant.transform import Blocks
from .graph_inputs import GraphInputs
from .report import GraphReport, LinearRecord

if TYPE_CHECKING:
    from .duquant.transform import DuQuantTransform


@dataclass(eq=False)
class LinearSite:
    node: fx.Node
    record: LinearRecord
    input_node: fx.Node
    weight_pos: int  # position of the weight among the graph inputs
    weight: torch.Tensor  # the real parameter seen at compile time
    bias: Any  # bias node or None
    group: Optional["GroupSite"] = None


@dataclass(eq=False)
class GroupSite:
    """Linears reading one activation: one transform, one quantization, several GEMMs."""

    name: str
    input_node: fx.Node
    members: list[LinearSite] = field(default_factory=list)


# -- fold_duquant's result ---------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineTransform:
    """What runs on a group's activation before it is quantized, as data: x -> x / smooth -> rot1
    -> x[..., perm] -> rot2 in ``dtype``. The tensors are derived-input placeholders (None: not run
    online); substitute_ops turns this into nodes by tracing apply_activation_transform."""

    dtype: torch.dtype
    smooth: Optional[fx.Node] = None
    rot1: Optional[fx.Node] = None
    perm: Optional[fx.Node] = None
    rot2: Optional[fx.Node] = None
    blocks1: Optional[Blocks] = None  # kind (shared or per block) and block size of rot1
    blocks2: Optional[Blocks] = None


@dataclass(frozen=True)
class OutputRotation:
    """QuantVLA's output rotation of one linear: its weight absorbs R_out, its GEMM result is restored."""

    tensor: torch.Tensor  # [nbo|1, Bo, Bo] as packed (the weight recipe reads it)
    node: fx.Node  # the same in ``dtype``, a derived-input placeholder
    blocks: Blocks
    dtype: torch.dtype


@dataclass
class LinearFold:
    """What fold_duquant decided for one linear: what its weight absorbs, what follows its GEMM."""

    transform: Optional["DuQuantTransform"] = None  # its input transform: the weight takes the inverse
    clip: float = 1.0  # the pack's weight clip
    row_div: Optional[torch.Tensor] = None  # [N] divisor of the output rows (a later group's smoothing)
    out_rot: Optional[OutputRotation] = None
    rounding: Any = None  # the pack's stored int4 values (duquant.packs.Rounding), used if still valid


@dataclass(eq=False)
class TransformGroup:
    """One activation transform and quantization: a group, or the part of one that shares a transform."""

    group: GroupSite
    members: list[LinearSite]
    online: Optional[OnlineTransform] = None


@dataclass
class DuQuantPlan:
    groups: list[TransformGroup]
    linears: dict[LinearSite, LinearFold]  # every selected linear

    @staticmethod
    def round_to_nearest(ctx: "RewriteContext") -> "DuQuantPlan":
        """No transform anywhere: every group as it is, every linear unchanged."""
        groups = [TransformGroup(g, list(g.members)) for g in ctx.groups]
        return DuQuantPlan(groups, {s: LinearFold() for s in ctx.kept})


# -- quantize_weights' result ------------------------------------------------------------------
@dataclass(frozen=True)
class PackedWeight:
    """One linear's weight as the op reads it: packed int4 + scales, or (quantize=False) the
    transformed float weight with no scale. Both are derived-input placeholders."""

    packed: fx.Node
    scale: Optional[fx.Node] = None
    # A group's linears share one pack (one GEMM): this linear's output rows [start, stop) in it,
    # the pack's stacked bias (None: no bias in the GEMM), and whether this linear's bias is in it.
    rows: Optional[tuple[int, int]] = None
    bias: Optional[fx.Node] = None
    bias_in_pack: bool = False


class RewriteContext:
    def __init__(self, gm: fx.GraphModule, example_inputs: list, config: QuantVLAConfig, graph_id: int, fake_mode, packs=None):
        self.gm = gm
        self.config = config
        self.graph_id = graph_id
        self.packs = packs
        self.report = GraphReport(graph_id)
        self.inputs = GraphInputs(gm, example_inputs, fake_mode)
        self.sites: list[LinearSite] = []  # match_linears
        self.groups: list[GroupSite] = []  # group_inputs
        self.duquant: Optional[DuQuantPlan] = None  # fold_duquant
        self.weights: dict[LinearSite, PackedWeight] = {}  # quantize_weights
        self.hoisted: set[fx.Node] = set()  # find_weight_only: the nodes hoist_weight_only computes once

    @property
    def kept(self) -> list[LinearSite]:
        return [s for s in self.sites if s.record.quantized]
