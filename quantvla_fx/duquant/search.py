"""The sequential calibration search: per input group, in execution order, the best W4A8 recipe.

As GPTQ and AWQ do, groups are calibrated one after another, each on inputs from the model with
every earlier group already replaced by its chosen recipe, simulated (forward hooks return the
fake-quantized output: int8 per-token activations after the transform x int4 weights), so errors
do not compound unseen. One pass over the calibration batches per group, plus one to find the
groups and their order; batches are streamed and only the current group's statistics are held
(a row reservoir, the per-channel max and, for GPTQ, the [K, K] Hessian).

Per group the candidates of candidates.py are scored; RTN is one of them, so on the calibration
rows the chosen recipe is never worse than round-to-nearest.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..quant.activations import dequantize_per_token, quantize_per_token
from ..quant.weights import dequantize_weight
from .candidates import GroupData, Scored, SearchGrid, TransformChoice, search_group
from .collect import _Reservoir, stable_seed
from .transform import DuQuantTransform

log = logging.getLogger("quantvla_fx")


@dataclass
class GroupRecorder:
    """Pre-hook on one member of the current group: streams its inputs into the statistics."""

    module: nn.Module
    reservoir: _Reservoir
    hessian: bool
    act_max: Tensor | None = None
    h: Tensor | None = None
    tokens: int = 0

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor):
            return
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return
        amax = x2.abs().amax(dim=0).float()
        self.act_max = amax if self.act_max is None else torch.maximum(self.act_max, amax)
        self.reservoir.add(x2)
        if self.hessian:
            xd = x2.to(torch.float64)
            self.h = xd.T @ xd if self.h is None else self.h.addmm_(xd.T, xd)
        self.tokens += x2.shape[0]
        return

    def data(self) -> GroupData:
        return GroupData(self.reservoir.rows, self.act_max.cpu(), self.h)


@dataclass
class FakeQuant:
    """Forward hook of a calibrated linear: its output as the chosen W4A8 recipe computes it."""

    transform: DuQuantTransform | None
    weight: Tensor  # dequantized int4 weight in the transformed basis, fp32 [N, K]
    bias: Tensor | None

    def __call__(self, module, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        xt = self.transform.transform_activation(x) if self.transform is not None else x.float()
        y = dequantize_per_token(*quantize_per_token(xt)) @ self.weight.T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out.dtype)


@dataclass
class GroupResult:
    name: str
    members: list[str]
    ranked: list[Scored]  # best first
    tokens: int = 0

    @property
    def chosen(self) -> Scored:
        return self.ranked[0]

    @property
    def rtn(self) -> Scored:
        return next(s for s in self.ranked if s.recipe.transform == TransformChoice() and s.recipe.clip == 1.0
                    and s.recipe.rounding == "rtn")


@dataclass
class SequentialSearch:
    """Runs the search; ``run_batches()`` runs every calibration batch through the model once."""

    linears: dict[str, nn.Linear]
    run_batches: Callable[[], int]
    grid: SearchGrid
    build: Callable[[str, list[Tensor], GroupData, list[TransformChoice]], list[DuQuantTransform | None]]
    group_size: int = -1
    weight_rounding: str = "rtn"
    rows: int = 512
    seed: int = 0
    damp: float = 0.01
    act_order: bool = False
    progress: bool = True
    _hooks: list = field(default_factory=list)

    def run(self, groups: Sequence[tuple[str, list[str]]]) -> list[GroupResult]:
        results: list[GroupResult] = []
        gain = 0.0
        bar = tqdm(groups, desc="DuQuant search", unit="group", disable=not self.progress)
        try:
            for name, members in bar:
                res = self._one(name, members)
                results.append(res)
                gain += res.chosen.score_db - res.rtn.score_db
                bar.set_postfix_str(f"{name}: {res.chosen.recipe.label()} {res.chosen.score_db:.1f} dB "
                                    f"(RTN {res.rtn.score_db:.1f}); mean gain {gain / len(results):+.2f} dB")
                log.info("DuQuant search %s: %s %.2f dB vs RTN %.2f dB (%d candidates, %d tokens)", name,
                         res.chosen.recipe.label(), res.chosen.score_db, res.rtn.score_db, len(res.ranked), res.tokens)
                self._replace(res)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
        return results

    def _one(self, name: str, members: list[str]) -> GroupResult:
        gen = torch.Generator().manual_seed(stable_seed(self.seed, members[0]))
        rec = GroupRecorder(self.linears[members[0]], _Reservoir(self.rows, gen), self.weight_rounding == "gptq")
        handle = rec.module.register_forward_pre_hook(rec, with_kwargs=True)
        try:
            self.run_batches()
        finally:
            handle.remove()
        if rec.act_max is None:
            raise ValueError(f"calibrate: group {name} did not run in the sequential pass (the model's "
                             "forward must call the same linears for the same batches every time)")
        data = rec.data()
        weights = [self.linears[f].weight for f in members]
        ranked = search_group(name, weights, data, self.grid, lambda c: self.build(name, weights, data, c),
                              group_size=self.group_size, weight_rounding=self.weight_rounding,
                              damp=self.damp, act_order=self.act_order)
        return GroupResult(name, list(members), ranked, rec.tokens)

    def _replace(self, res: GroupResult) -> None:
        """From now on the group's linears compute their chosen W4A8 output."""
        c = res.chosen
        for fqn, (q, s) in zip(res.members, c.weights):
            lin = self.linears[fqn]
            fq = FakeQuant(c.transform, dequantize_weight(q, s).to(lin.weight.device), lin.bias)
            self._hooks.append(lin.register_forward_hook(fq, with_kwargs=True))
