"""``quantvla-fx calibrate``: DuQuant packs for a checkpoint from a few observations, with progress."""
from __future__ import annotations

from pathlib import Path

from .common import UserError, add_selection_flags, config_from, user_errors

INPUTS_NAME = "inputs.safetensors"  # what the golden checkpoint ships beside its weights


def add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="compute DuQuant packs (smoothing + rotations) and save them",
        description="Run Pi0.5 sample_actions on calibration observations and save DuQuant packs for the "
                    "selected linears. Each --data file is one batch: a flat safetensors file with the "
                    "Observation fields (image.<camera>, image_mask.<camera>, state, tokenized_prompt, "
                    "tokenized_prompt_mask, token_ar_mask, token_loss_mask) and optionally 'noise' "
                    "[B, horizon, action_dim], as in tests/data/pi05_tiny/inputs.safetensors.")
    add_selection_flags(p)
    p.add_argument("--data", action="append", metavar="FILE",
                   help=f"calibration observations (repeatable; default: {INPUTS_NAME} beside the checkpoint)")
    p.add_argument("--out", required=True, help="where to write the packs (.safetensors)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothing strength (0 disables smoothing; default 0.5)")
    p.add_argument("--block-size", type=int, default=128, help="rotation block size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rotation bases (default 0)")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="one DuQuant recipe (--alpha, --block-size) for every group, as DuQuant's scripts. By default "
                        "each input group gets the best of a grid of recipes (RTN, smoothing, rotations, DuQuant x "
                        "weight clip), scored sequentially on the group's W4A8 outputs: never worse than RTN on the "
                        "calibration data (one pass over the data per group)")
    p.add_argument("--weight-rounding", choices=("rtn", "gptq"), default="rtn",
                   help="round int4 weights to nearest (default) or with GPTQ's error feedback "
                        "(the int4 values are stored in the pack, valid for these weights only)")
    p.set_defaults(run=run)


def _data_files(args) -> list[Path]:
    if args.data:
        files = [Path(d) for d in args.data]
    else:
        ckpt = Path(args.checkpoint)
        files = [(ckpt if ckpt.is_dir() else ckpt.parent) / INPUTS_NAME]
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: no such calibration file (pass --data FILE.safetensors)")
    return files


def run(args) -> int:
    import torch
    from safetensors.torch import load_file

    from ..duquant.calibrate import calibrate
    from ..models.pi05 import Observation, Pi05

    if args.weight_rounding == "gptq" and not args.search:
        raise UserError("--weight-rounding gptq cannot go with --no-search (the search picks the rounding per group)")
    config = config_from(args)
    files = _data_files(args)
    with user_errors():
        policy = Pi05.from_pretrained(args.checkpoint, config=args.preset).eval()
        batches = [(Observation.from_safetensors(f), load_file(str(f)).get("noise")) for f in files]
    with user_errors(), torch.no_grad():
        packs = calibrate(policy, batches, config, alpha=args.alpha or None, block_size=args.block_size,
                          seed=args.seed, run=lambda m, b: m.sample_actions(b[0], noise=b[1]),
                          search=args.search, weight_rounding=args.weight_rounding)
        path = packs.save(args.out)
    for name, t in packs.groups.items():
        parts = [p for p, v in (("smooth", t.smooth), ("rot1", t.rot1), ("perm", t.perm), ("rot2", t.rot2)) if v is not None]
        lp = packs[packs.members(name)[0]]
        chosen = f"; search: {lp.search['chosen']} {lp.search['score_db']:.2f} dB vs RTN {lp.search['rtn_db']:.2f}" \
            if lp.search else ""
        print(f"{name}: K={t.in_features}, block {t.block_size}, {' + '.join(parts) or 'identity'} "
              f"({len(packs.members(name))} linear(s)){chosen}")
    print(f"\n{len(packs)} linears in {len(packs.groups)} groups from {len(batches)} batch(es) -> {path}")
    return 0
