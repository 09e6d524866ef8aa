"""What the default calibration (per-group search, optionally GPTQ) costs at Pi0.5's real widths.

    python benchmarks/calibration_cost.py [--depth 1] [--select mlp|all] [--rounding gptq] [--device cuda]
    python benchmarks/calibration_cost.py --golden     # the golden tiny Pi0.5 (issue 10's 60 s bar)

pi05_libero widths (LM 2048 / MLP 16384, expert 1024 / 4096, SigLIP 1152) with ``--depth`` LM
and expert layers (1 vision layer, vocab 1024), openpi's random init, fp32, ``--batches`` random
observations. Times ``calibrate(search=True)`` and splits it into the model passes (one per group,
plus one) and the search work per group, so the full-depth cost can be read off: passes scale with
groups x the cost of one sample_actions, the search with the groups. Writes a JSON next to the
other results (``--out``). ``--golden``: the golden tiny Pi0.5 instead, calibrated as the slow
test and the README do (4 jittered observations, block 32, search + GPTQ); prints the seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.models.pi05 import Pi05, Pi05Config
from quantvla_fx.models.pi05.initialization import init_weights
from quantvla_fx.models.pi05.observation import jittered, random_observation


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--select", choices=("mlp", "all"), default="mlp")
    ap.add_argument("--rounding", choices=("rtn", "gptq"), default="gptq")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/<cpu|gpu name>/calibration_cost.json")
    ap.add_argument("--golden", action="store_true", help="time the golden tiny Pi0.5's calibration instead")
    args = ap.parse_args()
    if args.golden:
        return golden(args)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = Pi05Config.pi05_libero().with_overrides(vision_layers=1, llm_depth=args.depth, expert_depth=args.depth,
                                                  vocab_size=1024)
    policy = Pi05(cfg)
    init_weights(policy)
    policy = policy.eval().to(dev)
    obs = random_observation(cfg, 1, dev)  # seeded once: the other batches move its images a little
    batches = [(jittered(obs, s),) for s in range(args.batches)]
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0)).to(dev)
    run = lambda m, b: m.sample_actions(*b, noise=noise)  # noqa: E731
    qcfg = QuantVLAConfig.all_linears() if args.select == "all" else QuantVLAConfig.pi05_mlp()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        run(policy, batches[0])  # warm-up
        sync()
        t0 = time.perf_counter()
        for b in batches:
            run(policy, b)
        sync()
        pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    packs = calibrate(policy, batches, qcfg, run=run, weight_rounding=args.rounding, progress=True)
    sync()
    total_s = time.perf_counter() - t0
    groups = len(packs.groups)
    passes = groups + 1
    search_s = total_s - passes * pass_s
    full = Pi05Config.pi05_libero()
    full_groups = groups // args.depth * full.llm_depth if args.select == "mlp" else None
    result = {
        "model": f"pi05_libero widths, LM/expert depth {args.depth}, 1 vision layer, random init, fp32",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "host": platform.processor() or platform.machine(),
        "select": args.select, "rounding": args.rounding, "batches": args.batches,
        "linears": len(packs), "groups": groups, "calibrate_s": round(total_s, 1),
        "one_pass_over_batches_s": round(pass_s, 2), "passes": passes,
        "search_work_s": round(search_s, 1), "search_work_per_group_s": round(search_s / groups, 2),
        "chosen": {name: packs[packs.members(name)[0]].search["chosen"] for name in packs.groups},
    }
    if full_groups:
        # Same widths, so the same work per group; passes cost (groups + 1) x one pass at full depth.
        result["full_depth_groups"] = full_groups
        result["full_depth_search_work_s_estimate"] = round(search_s / groups * full_groups, 0)
    print(json.dumps(result, indent=1))
    where = "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev).split()[-1].lower()  # e.g. h200
    out = args.out or f"benchmarks/results/{where}/calibration_cost.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def golden(args):
    from pathlib import Path

    from safetensors.torch import load_file

    from quantvla_fx.models.pi05 import Observation

    root = Path(__file__).resolve().parents[1] / "tests" / "data" / "pi05_tiny"
    policy = Pi05.from_pretrained(root).eval()
    obs = Observation.from_safetensors(root / "inputs.safetensors")
    noise = load_file(str(root / "inputs.safetensors"))["noise"]
    t0 = time.perf_counter()
    packs = calibrate(policy, [(jittered(obs, s),) for s in range(4)], QuantVLAConfig.pi05_mlp(), block_size=32,
                      run=lambda m, b: m.sample_actions(*b, noise=noise), weight_rounding=args.rounding, progress=False)
    print(f"golden tiny Pi0.5: {len(packs)} linears in {len(packs.groups)} groups calibrated (search, "
          f"{args.rounding}) in {time.perf_counter() - t0:.1f} s on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
