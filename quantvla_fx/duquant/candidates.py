"""One input group's candidate recipes and their scores: what the calibration search compares.

A recipe is an input transform (none = round-to-nearest, smoothing only, rotations only, or the
full DuQuant chain) plus a weight clip and a rounding (RTN or GPTQ). Its score is the SQNR (dB,
torchao's compute_error) of the group's W4A8 outputs against the float outputs on the group's
calibration rows: activations transformed, then int8 per token exactly as the kernels see them,
times the int4 weights after the inverse transform. RTN (no transform, clip 1) is always scored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchao.quantization.utils import compute_error

from ..quant.activations import dequantize_per_token, quantize_per_token
from ..quant.weights import dequantize_weight, quantize_weight_int4
from .gptq import gptq_quantize
from .transform import DuQuantTransform

log = logging.getLogger("quantvla_fx")


@dataclass(frozen=True)
class SearchGrid:
    """The candidates per group: every (alpha or none) x (block size or none) x seed, each with every clip.

    alphas: smoothing strengths (none is always tried too). block_sizes: rotation blocks (none is
    always tried; sizes that do not divide K are skipped). seeds: rotation bases. clips: RTN clip
    ratios of the transformed weight. rotate_alphas: the greedy rotations cost most, so only
    "no smoothing" and the best ``rotate_alphas`` alphas by their smoothing-only score get rotation
    candidates. gptq_top: with weight_rounding="gptq", the transforms re-scored with GPTQ rounding
    (the best by RTN score, plus no transform).
    """

    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    block_sizes: tuple[int, ...] = (64, 128)
    clips: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85)
    seeds: tuple[int, ...] = (0,)
    rotate_alphas: int = 2
    gptq_top: int = 3

    def __post_init__(self):
        for a in self.alphas:
            if not 0.0 < a <= 1.0:
                raise ValueError(f"SearchGrid: alpha {a} not in (0, 1]")
        for c in self.clips:
            if not 0.0 < c <= 1.0:
                raise ValueError(f"SearchGrid: clip {c} not in (0, 1]")
        if any(b < 2 for b in self.block_sizes) or self.gptq_top < 0 or self.rotate_alphas < 0:
            raise ValueError(f"SearchGrid: block sizes must be >= 2 and gptq_top >= 0, got {self}")


@dataclass(frozen=True)
class TransformChoice:
    """The transform part of a recipe (hashable: names a candidate transform)."""

    alpha: float | None = None
    block_size: int | None = None
    seed: int = 0

    @property
    def kind(self) -> str:
        return {(False, False): "rtn", (True, False): "smooth", (False, True): "rotate",
                (True, True): "duquant"}[(self.alpha is not None, self.block_size is not None)]

    def label(self) -> str:
        parts = [self.kind]
        if self.alpha is not None:
            parts.append(f"a={self.alpha:g}")
        if self.block_size is not None:
            parts += [f"B={self.block_size}", f"seed={self.seed}"]
        return " ".join(parts)


@dataclass(frozen=True)
class Recipe:
    transform: TransformChoice
    clip: float = 1.0
    rounding: str = "rtn"  # or "gptq"

    def label(self) -> str:
        return f"{self.transform.label()} clip={self.clip:g} {self.rounding}"


RTN = Recipe(TransformChoice(), 1.0, "rtn")


def smoothing_choices(grid: SearchGrid) -> list[TransformChoice]:
    """Stage 1 (cheap): no transform first, then smoothing only."""
    return list(dict.fromkeys([TransformChoice()] + [TransformChoice(alpha=a) for a in grid.alphas]))


def rotation_choices(k: int, grid: SearchGrid, alphas: list) -> list[TransformChoice]:
    """Stage 2: rotations (block sizes dividing K) without smoothing and after the given alphas."""
    blocks = [b for b in dict.fromkeys(grid.block_sizes) if b <= k and k % b == 0]
    return list(dict.fromkeys(TransformChoice(a, b, s) for a in [None] + list(alphas) for b in blocks for s in grid.seeds))


@dataclass
class GroupData:
    """What the search needs of one group: its calibration rows and, for GPTQ, the Hessian."""

    rows: Tensor  # [n, K] sampled inputs (the model with every earlier group already quantized)
    act_max: Tensor  # [K] per-channel max |x| over all calibration tokens
    hessian: Tensor | None = None  # [K, K] fp64 sum of x^T x over all tokens (GPTQ)


@dataclass
class Scored:
    recipe: Recipe
    score_db: float
    transform: DuQuantTransform | None
    weights: list[tuple[Tensor, Tensor]] = field(repr=False, default_factory=list)  # (int values, scale)


def quantize_members(weights: list[Tensor], t: DuQuantTransform | None, clip: float, group_size: int,
                     rounding: str, hessian: Tensor | None = None, *, damp: float = 0.01,
                     act_order: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Each member's (int4 values, scale) for a recipe, in the transformed basis."""
    out = []
    h_t = transformed_hessian(hessian, t) if rounding == "gptq" else None
    for w in weights:
        wt = t.transform_weight(w).float() if t is not None else w.detach().float()
        if rounding == "gptq":
            out.append(gptq_quantize(wt, h_t, group_size, clip, damp=damp, act_order=act_order))
        else:
            out.append(quantize_weight_int4(wt, group_size, clip))
    return out


def transformed_hessian(h: Tensor, t: DuQuantTransform | None) -> Tensor:
    """M^T H M for the activation transform x -> x M: the Hessian of the transformed inputs."""
    if t is None:
        return h
    hm = t.transform_activation(h.to(torch.float64))  # rows h_i -> h_i M: H M
    return t.transform_activation(hm.T.contiguous())  # (H M)^T = M^T H, rows times M: M^T H M


def fake_input(x: Tensor, t: DuQuantTransform | None) -> Tensor:
    xt = t.transform_activation(x) if t is not None else x.float()
    return dequantize_per_token(*quantize_per_token(xt))


def score(xq: Tensor, y_ref: Tensor, qweights: list[tuple[Tensor, Tensor]]) -> float:
    """SQNR (dB) of the group's W4A8 outputs (members concatenated) vs the float outputs y_ref;
    ``xq`` is the transformed, int8-per-token (dequantized) input."""
    w = torch.cat([dequantize_weight(q, s) for q, s in qweights])
    return float(compute_error(y_ref, xq @ w.T.to(xq.device)))


def search_group(name: str, weights: list[Tensor], data: GroupData, grid: SearchGrid, build, *,
                 group_size: int, weight_rounding: str, damp: float = 0.01, act_order: bool = False) -> list[Scored]:
    """Every candidate of one group, scored; best first (ties keep the grid order: RTN first).

    ``build(choices) -> [DuQuantTransform | None]`` computes candidate transforms from the group's
    statistics (calibrate.py's smoothing and greedy rotations, batched over the choices).
    """
    x = data.rows.to(weights[0].device, torch.float32)
    y_ref = x @ torch.cat([w.detach().float() for w in weights]).T
    k = x.shape[1]
    results: list[Scored] = []
    best: list[Scored | None] = [None]  # only the leader keeps its int4 weights (memory)

    def add(recipe: Recipe, t, xq, qw) -> float:
        r = Scored(recipe, score(xq, y_ref, qw), t)
        results.append(r)
        if best[0] is None or r.score_db > best[0].score_db:
            if best[0] is not None:
                best[0].weights = []
            r.weights, best[0] = qw, r
        return r.score_db

    clips = tuple(dict.fromkeys((1.0,) + tuple(grid.clips)))
    per_transform: dict[TransformChoice, tuple[DuQuantTransform | None, float]] = {}

    def try_transforms(choices: list[TransformChoice]) -> None:
        for choice, t in zip(choices, build(choices)):
            xq = fake_input(x, t)
            top = max(add(Recipe(choice, clip, "rtn"), t, xq, quantize_members(weights, t, clip, group_size, "rtn"))
                      for clip in clips)
            per_transform[choice] = (t, top)

    try_transforms(smoothing_choices(grid))
    smoothed = sorted((c for c in per_transform if c.alpha is not None), key=lambda c: -per_transform[c][1])
    try_transforms(rotation_choices(k, grid, [c.alpha for c in smoothed[:grid.rotate_alphas]]))
    if weight_rounding == "gptq":
        if data.hessian is None:
            raise ValueError(f"search {name}: GPTQ rounding needs the group's Hessian")
        ranked = sorted(per_transform, key=lambda c: -per_transform[c][1])  # stable: grid order on ties
        for choice in dict.fromkeys([TransformChoice()] + ranked[:grid.gptq_top]):
            t = per_transform[choice][0]
            xq = fake_input(x, t)
            for clip in clips:
                add(Recipe(choice, clip, "gptq"), t, xq,
                    quantize_members(weights, t, clip, group_size, "gptq", data.hessian, damp=damp, act_order=act_order))
    # Best first; ties keep the scoring order, so RTN (scored first) wins a tie.
    order = sorted(range(len(results)), key=lambda i: (-results[i].score_db, i))
    return [results[i] for i in order]
