"""calibrate(model, batches, config) -> Packs: one W4A8 recipe per input group.

By default (``search=True``) each group gets the best of a grid of recipes (none = RTN,
smoothing only, rotations only, full DuQuant; x weight clip; x RTN or GPTQ rounding), scored
sequentially on its quantized outputs (search.py, candidates.py), so no group is worse than RTN on
the calibration data. ``search=False`` builds the one DuQuant transform below for every group, as
DuQuant's scripts do (it can lose to RTN: int4 weights dominate W4A8's error).

A DuQuant transform, per group (linears that read the same input tensor, e.g. gate/up or q/k/v):
  1. smoothing s from the per-channel activation max and the group's weight column max (smooth.py);
  2. rot1: greedy block rotation on the sampled, smoothed activation rows (rotation.py);
  3. perm: zigzag over the per-channel max after rot1 (permutation.py);
  4. rot2: greedy block rotation on the permuted rows, with a fresh random base.
Layers whose K is not a multiple of ``block_size`` get smoothing only (logged).  Everything is
deterministic given ``seed``: each group draws from its own generator seeded by (seed, group name),
so adding or removing other layers does not change a group's transform.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..naming import group_name
from .candidates import GroupData, SearchGrid, TransformChoice
from .collect import InputCollector, stable_seed
from .packs import FORMAT_VERSION, LayerPack, Packs, Rounding
from .search import GroupResult, SequentialSearch
from .permutation import zigzag_permutation
from .rotation import greedy_rotations, random_base
from .smooth import DEFAULT_ALPHA, smooth_scales, weight_column_max
from .transform import DuQuantTransform, block_rotate

log = logging.getLogger("quantvla_fx")


def _run_batch(model: nn.Module, batch: Any, run: Optional[Callable]) -> None:
    if run is not None:
        run(model, batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _peak(x: Tensor) -> float:
    return float(x.amax() - x.amin()) if x.numel() else 0.0


def group_transform(name: str, weights: list[Tensor], act_max: Tensor, rows: Tensor, *, alpha: Optional[float],
                    block_size: int, max_rotation_step: int, seed: int, exchange: str = "column",
                    device: Optional[torch.device] = None, log_level: int = logging.INFO) -> DuQuantTransform:
    """The DuQuant transform of one input group from its statistics."""
    return group_transforms(name, weights, act_max, rows, alphas=[alpha], block_size=block_size,
                            max_rotation_step=max_rotation_step, seed=seed, exchange=exchange, device=device,
                            log_level=log_level)[0]


def group_transforms(name: str, weights: list[Tensor], act_max: Tensor, rows: Tensor, *,
                     alphas: Sequence[Optional[float]], block_size: int, max_rotation_step: int, seed: int,
                     exchange: str = "column", device: Optional[torch.device] = None,
                     log_level: int = logging.INFO) -> list[DuQuantTransform]:
    """One DuQuant transform per smoothing strength in ``alphas`` (None = no smoothing), each
    exactly what group_transform gives for it; the greedy rotations of all run as one batch (they
    share the group's random bases: same seed, same draws)."""
    k = act_max.shape[0]
    w_max = weight_column_max(weights) if any(a is not None for a in alphas) else None
    smooths = [None if a is None else smooth_scales(act_max, w_max, a) for a in alphas]
    if k % block_size:
        log.log(log_level, "DuQuant %s: K=%d is not a multiple of block_size=%d; no rotation (smoothing only)", name, k, block_size)
        return [DuQuantTransform(in_features=k, block_size=block_size, smooth=s) for s in smooths]
    gen = torch.Generator().manual_seed(stable_seed(seed, name))
    base1, base2 = random_base(block_size, gen), random_base(block_size, gen)  # rot1's draw, then rot2's
    x = rows.to(device=device, dtype=torch.float32)
    xs = torch.stack([x if s is None else x / s.to(x.device) for s in smooths])
    rot1s, info1 = greedy_rotations(xs, block_size, max_rotation_step, base1, exchange)
    rot1s = rot1s.to(torch.float32).unsqueeze(1)  # [C, 1, B, B]: one shared matrix per candidate
    x1s = [block_rotate(xs[j], rot1s[j].to(x.device)) for j in range(len(alphas))]
    perms = [zigzag_permutation(x1.abs().amax(dim=0), block_size) for x1 in x1s]
    x2s = torch.stack([x1.index_select(-1, p.to(x1.device)) for x1, p in zip(x1s, perms)])
    rot2s, info2 = greedy_rotations(x2s, block_size, max_rotation_step, base2, exchange)
    rot2s = rot2s.to(torch.float32).unsqueeze(1)
    out = []
    for j, smooth in enumerate(smooths):
        if log.isEnabledFor(log_level):
            x3 = block_rotate(x2s[j], rot2s[j].to(x.device))
            log.log(log_level, "DuQuant %s%s: K=%d, %d rows; peak raw %.4g -> smoothed %.4g -> rot1 %.4g (%d steps) -> "
                    "rot2 %.4g (%d steps)", name, "" if alphas[j] is None else f" (alpha {alphas[j]:g})", k,
                    rows.shape[0], _peak(rows), _peak(xs[j]), _peak(x1s[j]), info1[j]["steps"], _peak(x3),
                    info2[j]["steps"])
        out.append(DuQuantTransform(in_features=k, block_size=block_size, smooth=smooth, rot1=rot1s[j],
                                    perm=perms[j], rot2=rot2s[j]))
    return out


def calibrate(model: nn.Module, batches: Iterable[Any], config, *, alpha: Optional[float] = DEFAULT_ALPHA,
              block_size: int = 128, max_rotation_step: int = 256, weight_clip: float = 1.0, seed: int = 0,
              rotation_rows: int = 512, exchange: str = "column", run: Optional[Callable] = None,
              progress: bool = True, device: Optional[torch.device] = None, search: bool = True,
              grid: Optional[SearchGrid] = None, weight_rounding: str = "rtn", act_order: bool = False,
              damp: float = 0.01) -> Packs:
    """Run ``batches`` through ``model`` and compute DuQuant packs for the linears ``config`` selects.

    batches: iterable of positional-args tuples/lists, kwargs dicts or single tensors passed to
        ``model(...)``; with ``run``, each batch is handed to ``run(model, batch)`` instead (e.g.
        ``lambda m, b: m.sample_actions(*b)``).
    alpha: smoothing migration strength (0.6 = DuQuant run.sh); None = no smoothing (rotations and
        permutation only).  block_size: rotation block B.
    max_rotation_step: greedy steps per rotation (256 = DuQuant's scripts).  weight_clip: RTN clip
        ratio stored in every LayerPack (DuQuant's swc is 0.8).  rotation_rows: reservoir size of
        token rows per group for the rotation search.  exchange: "column" (default) or "row"
        (DuQuant's code; see rotation.py).  device: where the rotation search runs (default: the
        device of the group's first weight).
    search: True (default): the sequential per-group search (module docstring; never worse than
        RTN on the calibration rows); its grid is ``grid``, by default SearchGrid() with ``alpha``,
        ``block_size``, ``weight_clip`` added and ``seed`` as the rotation seed. False: one DuQuant
        transform with those parameters for every group (DuQuant's scripts).
    weight_rounding: "rtn" or "gptq" (search only: GPTQ int4 values are stored in the pack, valid
        for the float weights they came from). act_order, damp: GPTQ's column order and damping.
    Batches are run once per group (plus once) when searching: pass a list, not an iterator (an
    iterator is read into a list first).  Scores use ``config.group_size``, the weight format that
    will run.
    The model is run under ``torch.no_grad()``; its train/eval mode is left as it is.  Hooks are
    removed on every exit path.
    """
    if weight_rounding not in ("rtn", "gptq"):
        raise ValueError(f"weight_rounding must be 'rtn' or 'gptq', got {weight_rounding!r}")
    if weight_rounding == "gptq" and not search:
        raise ValueError("weight_rounding='gptq' needs search=True (the rounding is chosen per group by the search)")
    if not 0.0 < weight_clip <= 1.0:
        raise ValueError(f"weight_clip must be in (0, 1], got {weight_clip}")
    if rotation_rows < 1 or block_size < 2 or max_rotation_step < 0:
        raise ValueError(f"need rotation_rows >= 1, block_size >= 2, max_rotation_step >= 0; got "
                         f"{rotation_rows}, {block_size}, {max_rotation_step}")
    linears: dict[str, nn.Linear] = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            ok, why = config.match(fqn)
            log.log(logging.INFO if getattr(config, "debug", False) else logging.DEBUG,
                    "DuQuant calibrate: %s %s (%s)", fqn, "selected" if ok else "skipped", why)
            if ok:
                linears[fqn] = mod
    if not linears:
        raise ValueError("calibrate: the config selects no nn.Linear of this model")
    if model.training:
        log.warning("calibrate: the model is in training mode (dropout etc. will affect the statistics)")

    if search:
        batches = list(batches)  # one pass per group
    collector = InputCollector(linears, max_rows=0 if search else rotation_rows, seed=seed)
    n_batches = 0
    with collector, torch.no_grad():
        for batch in tqdm(batches, desc="DuQuant calibration" if not search else "DuQuant groups",
                          unit="batch", disable=not progress):
            _run_batch(model, batch, run)
            collector.end_batch()
            n_batches += 1
    if n_batches == 0:
        raise ValueError("calibrate: no calibration batches")
    if search:
        if grid is None:  # the default grid, with the caller's single recipe among the candidates
            d = SearchGrid()
            grid = SearchGrid(alphas=tuple(dict.fromkeys(d.alphas + ((alpha,) if alpha else ()))),
                              block_sizes=tuple(dict.fromkeys(d.block_sizes + (block_size,))),
                              clips=tuple(dict.fromkeys(d.clips + (weight_clip,))), seeds=(seed,))
        return _search(model, batches, run, linears, collector, config, grid, n_batches, progress=progress,
                       weight_rounding=weight_rounding, rows=rotation_rows, seed=seed, damp=damp,
                       act_order=act_order, max_rotation_step=max_rotation_step, exchange=exchange, device=device)

    layers = []
    for members in collector.groups():
        name = group_name(members)
        act_max, rows, _ = collector.group_stats(members)
        weights = [linears[f].weight for f in members]
        t = group_transform(name, weights, act_max, rows, alpha=alpha, block_size=block_size,
                            max_rotation_step=max_rotation_step, seed=seed, exchange=exchange,
                            device=device if device is not None else weights[0].device)
        layers += [LayerPack(fqn=f, transform=t, group=name, weight_clip=weight_clip) for f in members]
    _warn_missed(linears, layers)
    meta = {"format_version": FORMAT_VERSION, "source": "quantvla_fx.calibrate", "bits": "w4a8",
            "alpha": alpha, "block_size": block_size, "max_rotation_step": max_rotation_step,
            "weight_clip": weight_clip, "seed": seed, "rotation_rows": rotation_rows, "exchange": exchange,
            "batches": n_batches}
    packs = Packs(layers, meta=meta)
    packs.validate()
    log.info("DuQuant calibrate: %d linears in %d groups from %d batches", len(layers), len(packs.groups), n_batches)
    return packs


def _search(model, batches, run, linears, collector, config, grid, n_batches, *, progress, weight_rounding, rows,
            seed, damp, act_order, max_rotation_step, exchange, device) -> Packs:
    groups = [(group_name(m), m) for m in collector.groups_in_call_order()]

    def run_batches() -> int:
        with torch.no_grad():
            for batch in batches:
                _run_batch(model, batch, run)
        return len(batches)

    def build(name: str, weights, data: GroupData, choices: list[TransformChoice]) -> list[Optional[DuQuantTransform]]:
        k = data.act_max.shape[0]
        out: dict[TransformChoice, Optional[DuQuantTransform]] = {}
        rotated: dict[tuple[int, int], list[TransformChoice]] = {}  # one batched search per (B, seed)
        for c in choices:
            if c.block_size is None:
                out[c] = None if c.alpha is None else DuQuantTransform(
                    in_features=k, block_size=k, smooth=smooth_scales(data.act_max, weight_column_max(weights), c.alpha))
            else:
                rotated.setdefault((c.block_size, c.seed), []).append(c)
        for (b, s), cs in rotated.items():
            ts = group_transforms(name, weights, data.act_max, data.rows, alphas=[c.alpha for c in cs], block_size=b,
                                  max_rotation_step=max_rotation_step, seed=s, exchange=exchange,
                                  device=device if device is not None else weights[0].device, log_level=logging.DEBUG)
            out.update(zip(cs, ts))
        return [out[c] for c in choices]

    group_size = int(getattr(config, "group_size", -1))
    searcher = SequentialSearch(linears, run_batches, grid, build, group_size=group_size,
                                weight_rounding=weight_rounding, rows=rows, seed=seed, damp=damp,
                                act_order=act_order, progress=progress)
    results = searcher.run(groups)
    layers = [lp for res in results for lp in _layer_packs(res, linears, group_size)]
    _warn_missed(linears, layers)
    meta = {"format_version": FORMAT_VERSION, "source": "quantvla_fx.calibrate", "bits": "w4a8", "method": "search",
            "grid": {"alphas": list(grid.alphas), "block_sizes": list(grid.block_sizes), "clips": list(grid.clips),
                     "seeds": list(grid.seeds), "rotate_alphas": grid.rotate_alphas,
                     "gptq_top": grid.gptq_top},
            "weight_rounding": weight_rounding, "group_size": group_size, "act_order": act_order, "damp": damp,
            "max_rotation_step": max_rotation_step, "seed": seed, "rotation_rows": rows, "exchange": exchange,
            "batches": n_batches,
            "gain_db": {r.name: round(r.chosen.score_db - r.rtn.score_db, 3) for r in results}}
    packs = Packs(layers, meta=meta)
    packs.validate()
    log.info("DuQuant search: %d linears in %d groups from %d batches; mean gain over RTN %+.2f dB on the "
             "calibration rows", len(layers), len(packs.groups), n_batches,
             sum(meta["gain_db"].values()) / max(len(results), 1))
    return packs


def _layer_packs(res: GroupResult, linears, group_size: int) -> list[LayerPack]:
    c = res.chosen
    k = linears[res.members[0]].in_features
    t = c.transform if c.transform is not None else DuQuantTransform(in_features=k, block_size=k)
    record = {"chosen": c.recipe.label(), "score_db": round(c.score_db, 3), "rtn_db": round(res.rtn.score_db, 3),
              "tokens": res.tokens, "candidates": {s.recipe.label(): round(s.score_db, 3) for s in res.ranked}}
    out = []
    for fqn, (q, scale) in zip(res.members, c.weights):
        rounding = Rounding.of(q, scale, group_size, linears[fqn].weight) if c.recipe.rounding == "gptq" else None
        out.append(LayerPack(fqn=fqn, transform=t, group=res.name, weight_clip=c.recipe.clip, search=record,
                             rounding=rounding))
    return out


def _warn_missed(linears, layers) -> None:
    missed = [f for f in linears if f not in {lp.fqn for lp in layers}]
    if missed:
        log.warning("calibrate: %d selected linear(s) never ran during calibration and get no pack: %s",
                    len(missed), missed[:8])
