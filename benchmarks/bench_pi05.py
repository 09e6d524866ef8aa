"""End-to-end benchmark: full-size Pi0.5 sample_actions, quantvla W4A8 vs Inductor bf16.

    python benchmarks/bench_pi05.py [--horizon 10] [--kernel auto] [--out benchmarks/results]

Random weights (openpi's bf16 dtype policy), B=1, 10 denoise steps.  Both variants are
torch.compile'd in this run and timed by quantvla_fx/kernels/timing.py (CUDA graphs with L2 flushed when
the compiled function can be captured, else CUDA events; the method used is recorded).  Reports
latency medians, peak GPU memory, weight bytes of the quantized linears, compile time cold and
warm, and the action SQNR vs bf16.  Writes <out>/<gpu>/bench_pi05_h<H>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.kernels.timing import events_us, graph_us
from quantvla_fx.models.pi05 import Pi05, Pi05Config, apply_dtype_policy
from quantvla_fx.models.pi05.observation import random_observation
from quantvla_fx.models.pi05.initialization import init_weights


def measure(label, make_fn, obs, noise, warm_compile=True):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn = make_fn()
    with torch.no_grad():
        out = fn(obs, noise=noise)
    torch.cuda.synchronize()
    cold = time.perf_counter() - t0
    res = {"compile_cold_s": cold}
    if warm_compile:
        torch._dynamo.reset()  # warm: same process, Inductor's caches hot, Dynamo traces again
        t0 = time.perf_counter()
        fn = make_fn()
        with torch.no_grad():
            out = fn(obs, noise=noise)
        torch.cuda.synchronize()
        res["compile_warm_s"] = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn(obs, noise=noise)
        torch.cuda.synchronize()
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        try:
            res["latency_us"] = graph_us(lambda: fn(obs, noise=noise), reps=50)
            res["timing"] = "cuda_graph_l2_flushed"
        except Exception as e:
            res["latency_us"] = events_us(lambda: fn(obs, noise=noise))
            res["timing"] = f"cuda_events (graph capture failed: {type(e).__name__})"
    print(label, json.dumps(res), flush=True)
    return out, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-warm-compile", action="store_true", help="skip the warm-cache compile timing")
    ap.add_argument("--variants", default="inductor_bf16,quantvla", help="which variants to run")
    args = ap.parse_args()
    torch.manual_seed(0)
    presets = {10: Pi05Config.pi05_libero, 15: Pi05Config.pi05_droid, 50: Pi05Config.pi05_base}
    if args.horizon not in presets:
        raise SystemExit(f"--horizon must be one of {sorted(presets)} (the openpi presets)")
    cfg = presets[args.horizon]()
    model = Pi05(cfg)
    init_weights(model)
    model = apply_dtype_policy(model.cuda(), "openpi_bf16").eval()
    obs = random_observation(cfg, 1, "cuda")
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, device="cuda")

    qcfg = QuantVLAConfig.pi05_mlp(kernel=args.kernel)
    slug = torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "_")
    os.makedirs(os.path.join(args.out, slug), exist_ok=True)
    path = os.path.join(args.out, slug, f"bench_pi05_h{cfg.action_horizon}.json")
    variants = args.variants.split(",")
    with torch.no_grad():
        ref = model.sample_actions(obs, noise=noise)  # eager bf16, the accuracy reference
    bf16 = {}
    if "inductor_bf16" in variants:
        ref, bf16 = measure("inductor_bf16", lambda: torch.compile(model.sample_actions), obs, noise,
                            not args.no_warm_compile)
    with open(path, "w") as f:  # partial result: survives a time-out in the second variant
        json.dump({"gpu": torch.cuda.get_device_name(), "inductor_bf16": bf16}, f, indent=1)
    torch._dynamo.reset()
    if "quantvla" not in variants:
        return
    out, quant = measure("quantvla", lambda: torch.compile(model.sample_actions, backend="quantvla",
                                                             options=qcfg.to_options()), obs, noise,
                          not args.no_warm_compile)
    from torchao.quantization.utils import compute_error

    sel = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and qcfg.match(n)[0]]
    bf16_bytes = sum(m.weight.numel() * 2 for m in sel)
    w4_bytes = sum(m.weight.numel() // 2 + m.weight.shape[0] * 4 for m in sel)
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "horizon": cfg.action_horizon,
        "batch": 1, "num_steps": cfg.num_steps, "kernel": args.kernel, "quantized_linears": len(sel),
        "inductor_bf16": bf16, "quantvla": quant,
        "speedup": bf16["latency_us"] / quant["latency_us"] if bf16 else None,
        "weight_bytes_bf16": bf16_bytes, "weight_bytes_w4": w4_bytes, "weight_bytes_ratio": w4_bytes / bf16_bytes,
        "action_sqnr_db_vs_bf16": float(compute_error(ref.float(), out.float())),
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
