"""Where a quantvla compile of Pi0.5 ``sample_actions`` spends its time, per stage, on the CPU.

    python benchmarks/compile_stages_cpu.py                       # golden-size tiny Pi0.5, eager lowering
    python benchmarks/compile_stages_cpu.py --depth 8 --lowering inductor
    python benchmarks/compile_stages_cpu.py --depths 2,4,8        # scaling of each stage with depth
    python benchmarks/compile_stages_cpu.py --depths 2,4 --lowering inductor --regions   # each layer lowered once

A random-weight tiny Pi0.5 (the golden test's widths) whose LM, expert and vision stacks all get
``--depth`` layers, compiled with ``backend="quantvla"`` and every pass on (``--select all``: every
linear; DuQuant packs with ``--duquant``).  Per compile, in seconds: Dynamo (the first call's
wall time less the backend and one run of the compiled graph), each rewrite stage of
``backend.rewrite`` (from the report's ``timings_s``), the lowering (AOTAutograd + Inductor;
0 with ``--lowering eager``) and the first call's run.  A fresh Inductor cache directory per
process unless ``TORCHINDUCTOR_CACHE_DIR`` is set.  Prints one JSON line per depth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def measure(depth: int, select: str, lowering: str, duquant: bool, steps: int, regions: bool = False) -> dict:
    import torch

    import quantvla_fx.backend as backend
    from quantvla_fx import QuantVLAConfig, calibrate
    from quantvla_fx.models.pi05 import Pi05, Pi05Config
    from quantvla_fx.models.pi05.observation import random_observation

    torch.manual_seed(0)
    cfg = Pi05Config.tiny(num_steps=steps).with_overrides(llm_depth=depth, expert_depth=depth, vision_layers=depth)
    model = Pi05(cfg).eval()
    obs = random_observation(cfg, 1, "cpu")
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(1))
    make = QuantVLAConfig.all_linears if select == "all" else QuantVLAConfig.pi05_mlp
    qcfg = make(lowering=lowering, compile_regions=regions)
    if duquant:
        packs = calibrate(model, [(obs,)], qcfg, block_size=32, progress=False, search=False,
                          run=lambda m, b: m.sample_actions(*b, noise=noise))
        qcfg = qcfg.replace(packs=packs)

    spent = {"backend": 0.0, "lowering": 0.0}
    original_backend, original_compile_fx = backend.quantvla_backend, backend.compile_fx

    def timed_compile_fx(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_compile_fx(*a, **k)
        finally:
            spent["lowering"] += time.perf_counter() - t0

    def timed_backend(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_backend(*a, **k)
        finally:
            spent["backend"] += time.perf_counter() - t0

    backend.compile_fx = timed_compile_fx
    torch._dynamo.reset()
    fn = torch.compile(model.sample_actions, backend=timed_backend_with_options(timed_backend, qcfg), fullgraph=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(obs, noise=noise)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn(obs, noise=noise)
        run = time.perf_counter() - t0
    backend.compile_fx = original_compile_fx
    report = backend.report_book(None).graphs[-1]
    rewrite = report.timings_s
    return {"depth": depth, "select": select, "lowering": lowering, "compile_regions": regions, "duquant": duquant,
            "steps": steps,
            "first_call_s": round(first, 2),
            "dynamo_s": round(first - spent["backend"] - run, 2),
            "rewrite_s": round(sum(v for k, v in rewrite.items() if not k.startswith("packing")), 2),
            "rewrite_stages_s": rewrite,
            "lowering_s": round(spent["lowering"], 2),
            "run_s": round(run, 3),
            "linears": len(report.linears), "quantized": len(report.quantized)}


def timed_backend_with_options(fn, qcfg):
    options = qcfg.to_options()
    return lambda gm, example_inputs: fn(gm, example_inputs, options=options)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--depths", default=None, help="comma-separated depths, each in a new process")
    ap.add_argument("--select", choices=("all", "mlp"), default="all")
    ap.add_argument("--lowering", choices=("eager", "inductor"), default="eager")
    ap.add_argument("--duquant", action="store_true", help="calibrate DuQuant packs first (folds run)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--regions", action="store_true", help="compile_regions=True: each distinct layer lowered once")
    args = ap.parse_args()
    if args.depths:
        for d in args.depths.split(","):
            cmd = [sys.executable, __file__, "--depth", d, "--select", args.select, "--lowering", args.lowering,
                   "--steps", str(args.steps)] + (["--duquant"] if args.duquant else []) + \
                (["--regions"] if args.regions else [])
            subprocess.run(cmd, check=True)
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="quantvla_cold_"))
    print(json.dumps(measure(args.depth, args.select, args.lowering, args.duquant, args.steps, args.regions)), flush=True)


if __name__ == "__main__":
    main()
