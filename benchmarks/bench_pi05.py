"""End-to-end benchmark: full-size Pi0.5 ``sample_actions``, three ways, side by side in one process.

    python benchmarks/bench_pi05.py                       # cold compiles (one new process each), then measure
    python benchmarks/bench_pi05.py --phase cold --variant quantvla_w4a8
    python benchmarks/bench_pi05.py --phase measure

Variants (same model object, same inputs):
  inductor_bf16   our Pi05 compiled by plain Inductor (``mode="reduce-overhead"``: CUDA graphs)
  quantvla_bf16   the quantvla backend with ``quantize=False``: every rewrite, no quantization
  quantvla_w4a8   the quantvla backend as shipped (W4A8 on the default selection)
  quantvla_w4a16  (optional, not in the default list) weight-only W4A16, group 128 (the seeds' W4FP16)
  quantvla_w4a8_regions  (optional) quantvla_w4a8 with ``compile_regions=True`` (each distinct
                  layer lowered once): its compile_cold_s and latency against quantvla_w4a8's
each compiled the way a user would run a policy: with CUDA graphs (``cudagraphs=True``).

Phase ``cold``: one variant in this (new) process with an empty Inductor/Triton cache of its own
(``<cache>/<variant>``); records ``compile_cold_s`` (compile + first call).  Phase ``measure``: all
variants in one process, each compiled against the cache its cold run left (``compile_warm_s``,
new process), then per variant: ``latency_ms`` (GPU time of one call, L2 flushed before it, the
CPU's launch work hidden behind a GPU sleep: the CUDA-graph replay itself), ``user_path_ms`` (wall
time of one call as the user sees it, L2 flushed), ``peak_mem_gib``, resident weight bytes, kernel
launches and kernel time by category (torch.profiler), and the action SQNR vs eager bf16.  Random
weights (openpi's bf16 dtype policy), B=1, 10 denoise steps.  Writes
``<out>/<gpu>/bench_pi05_h<H>.json`` (partial after each variant).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("inductor_bf16", "quantvla_bf16", "quantvla_w4a8")
OPTIONAL_VARIANTS = ("quantvla_w4a16", "quantvla_w4a8_regions")  # --variants ...,quantvla_w4a16
PRESETS = {10: "pi05_libero", 15: "pi05_droid", 50: "pi05_base"}


def _use_cache(cache: str, variant: str, empty: bool) -> None:
    d = os.path.abspath(os.path.join(cache, variant))
    if empty and os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
    os.environ["TRITON_CACHE_DIR"] = os.path.join(d, "triton")


def build_model(horizon: int, depth=None):
    from quantvla_fx.models.pi05 import Pi05, Pi05Config, apply_dtype_policy
    from quantvla_fx.models.pi05.initialization import init_weights
    from quantvla_fx.models.pi05.observation import random_observation

    torch.manual_seed(0)
    cfg = getattr(Pi05Config, PRESETS[horizon])()
    if depth:  # smoke runs of this script only: not a Pi0.5 figure
        cfg = cfg.with_overrides(vision_layers=depth, llm_depth=depth, expert_depth=depth)
    model = Pi05(cfg)
    init_weights(model)
    model = apply_dtype_policy(model.cuda(), "openpi_bf16").eval()
    obs = random_observation(cfg, 1, "cuda")
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, device="cuda")
    return cfg, model, obs, noise


def quant_config(variant: str, args):
    from quantvla_fx import QuantVLAConfig

    make = QuantVLAConfig.all_linears if args.select == "all" else QuantVLAConfig.pi05_mlp
    dump = os.path.join(args.dump_dir, variant) if args.dump_dir else None
    return make(kernel=args.kernel, cudagraphs=True, quantize=variant != "quantvla_bf16",
                scheme="w4a16" if variant == "quantvla_w4a16" else "w4a8", dump_dir=dump,
                compile_regions=variant.endswith("_regions"))


def compile_variant(variant: str, model, args):
    if variant == "inductor_bf16":
        return torch.compile(model.sample_actions, mode="reduce-overhead")
    return torch.compile(model.sample_actions, backend="quantvla", options=quant_config(variant, args).to_options())


def call(fn, obs, noise):
    torch.compiler.cudagraph_mark_step_begin()
    with torch.no_grad():
        return fn(obs, noise=noise)


def first_call_s(fn, obs, noise) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = call(fn, obs, noise).clone()
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    # Where the compile went (Dynamo, AOTAutograd, Inductor, our backend), for the log.
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    return took, out


def gpu_and_wall_ms(fn, reps: int) -> tuple[float, float]:
    """(median GPU ms of one call, median wall ms of one call), L2 flushed before each."""
    from quantvla_fx.kernels.timing import L2_FLUSH_BYTES

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    gpu, wall = [], []
    for _ in range(reps):  # GPU time: the sleep keeps the GPU busy while the CPU enqueues the call
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        torch.cuda._sleep(50_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        gpu.append(a.elapsed_time(b))
    for _ in range(reps):
        flush.zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(gpu), statistics.median(wall)


def resident_weight_bytes(model) -> int:
    """Bytes of the model's GPU parameters/buffers that hold storage, plus every derived input."""
    from quantvla_fx.derived_inputs import PACK_CACHE

    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for outs, _ in PACK_CACHE._entries.values() for t in outs]
    for t in tensors:
        st = t.untyped_storage()
        if t.is_cuda and st.data_ptr() not in seen and st.nbytes():
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def release(model) -> None:
    """Forget compiled graphs, CUDA-graph pools and packs between variants (fair memory figures);
    float weights a quantvla variant offloaded come back for the next variant."""
    import quantvla_fx
    from quantvla_fx import float_weights

    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    except ImportError:
        pass
    quantvla_fx.refresh()
    float_weights.restore(model, keep=False)
    gc.collect()
    torch.cuda.empty_cache()


def phase_cold(args) -> None:
    _use_cache(args.cache, args.variant, empty=True)
    _, model, obs, noise = build_model(args.horizon, args.depth)
    fn = compile_variant(args.variant, model, args)
    cold, _ = first_call_s(fn, obs, noise)
    path = os.path.join(args.cache, f"cold_{args.variant}_h{args.horizon}.json")
    with open(path, "w") as f:
        json.dump({"compile_cold_s": cold}, f)
    print(args.variant, "compile_cold_s", round(cold, 1), flush=True)


def measure_variant(variant, model, obs, noise, ref, args) -> dict:
    from torchao.quantization.utils import compute_error

    had_cache = os.path.isdir(os.path.join(args.cache, variant)) and bool(os.listdir(os.path.join(args.cache, variant)))
    _use_cache(args.cache, variant, empty=False)
    fn = compile_variant(variant, model, args)
    first, out = first_call_s(fn, obs, noise)
    for _ in range(3):  # CUDA-graph warm-up and recording
        call(fn, obs, noise)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call(fn, obs, noise)
    torch.cuda.synchronize()
    # Without a cache from a cold run this first compile is itself cold (in a warm process).
    res = {"compile_warm_s": round(first, 2) if had_cache else None, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
           "resident_weight_bytes": resident_weight_bytes(model)}
    gpu_ms, wall_ms = gpu_and_wall_ms(lambda: call(fn, obs, noise), args.reps)
    res.update(latency_ms=round(gpu_ms, 3), user_path_ms=round(wall_ms, 3))
    from kernel_categories import profile_call

    res.update(profile_call(lambda: call(fn, obs, noise)))
    res["sqnr_db_vs_eager_bf16"] = round(float(compute_error(ref.float(), out.float())), 2)
    cold = os.path.join(args.cache, f"cold_{variant}_h{args.horizon}.json")
    res["compile_cold_s"] = None if had_cache else round(first, 1)
    if had_cache and os.path.exists(cold):
        with open(cold) as f:
            res["compile_cold_s"] = round(json.load(f)["compile_cold_s"], 1)
    if variant != "inductor_bf16":
        res["config"] = {k: v for k, v in quant_config(variant, args).to_options().items()
                         if k in ("include", "kernel", "quantize", "cudagraphs", "scheme", "w4a16_group_size")}
    fn = None  # drop the compiled graphs before the next variant
    release(model)
    return res


def phase_measure(args) -> None:
    cfg, model, obs, noise = build_model(args.horizon, args.depth)
    with torch.no_grad():
        ref = model.sample_actions(obs, noise=noise).clone()  # eager bf16: the accuracy reference
    slug = torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "_")
    os.makedirs(os.path.join(args.out, slug), exist_ok=True)
    path = os.path.join(args.out, slug, f"bench_pi05_h{cfg.action_horizon}.json")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "horizon": cfg.action_horizon,
              "depth_override": args.depth, "batch": 1, "num_steps": cfg.num_steps, "cameras": len(obs.images), "select": args.select,
              "commit": _commit(), "timing": "latency_ms: GPU time of one call (CUDA-graph replay), L2 flushed; "
              f"user_path_ms: wall time of one call; medians of {args.reps}"}
    for variant in args.variants.split(","):
        result[variant] = measure_variant(variant, model, obs, noise, ref, args)
        print(variant, json.dumps({k: v for k, v in result[variant].items() if k != "top_kernels"}), flush=True)
        with open(path, "w") as f:  # partial results survive a time-out in a later variant
            json.dump(result, f, indent=1)
    base = result.get("inductor_bf16", {}).get("latency_ms")
    for v in VARIANTS[1:] + OPTIONAL_VARIANTS:
        if base and v in result:
            result[v]["speedup_vs_inductor_bf16"] = round(base / result[v]["latency_ms"], 3)
    if "quantvla_w4a8" in result and "quantvla_w4a8_regions" in result:
        r = result["quantvla_w4a8_regions"]
        r["latency_vs_unrolled"] = round(r["latency_ms"] / result["quantvla_w4a8"]["latency_ms"], 3)
    for q in ("quantvla_w4a8", "quantvla_w4a16"):
        if "quantvla_bf16" in result and q in result:
            result[q]["speedup_vs_quantvla_bf16"] = round(result["quantvla_bf16"]["latency_ms"] / result[q]["latency_ms"], 3)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(path, flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("all", "cold", "measure"), default="all")
    ap.add_argument("--variant", choices=VARIANTS + OPTIONAL_VARIANTS, help="for --phase cold")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--horizon", type=int, default=10, choices=sorted(PRESETS))
    ap.add_argument("--select", choices=("mlp", "all"), default="mlp", help="quantvla selection: pi05_mlp or all_linears")
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--depth", type=int, help="smoke test: keep this many layers per tower (not a Pi0.5 figure)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dump-dir", help="write the quantvla graph dumps and rewrite report per variant here")
    ap.add_argument("--cache", default=".cache/bench_pi05", help="per-variant Inductor/Triton caches (git-ignored)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import logging

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("quantvla_fx").setLevel(logging.INFO)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(args.cache, exist_ok=True)
    if args.phase == "cold":
        if args.variant is None:
            raise SystemExit("--phase cold needs --variant")
        return phase_cold(args)
    if args.phase == "all":
        for v in args.variants.split(","):  # each cold compile in a new process with empty caches
            subprocess.run([sys.executable, __file__, "--phase", "cold", "--variant", v, "--horizon", str(args.horizon),
                            "--select", args.select, "--kernel", args.kernel, "--cache", args.cache]
                           + (["--depth", str(args.depth)] if args.depth else []), check=True)
    phase_measure(args)


if __name__ == "__main__":
    main()
