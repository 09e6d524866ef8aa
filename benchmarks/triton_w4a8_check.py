"""Check and time the Triton W4A8 kernel against cuBLAS bf16 on the Pi0.5 GEMM shapes (GPU only).

    PYTHONPATH=$PWD python benchmarks/triton_w4a8_check.py --out results.json \
        [--phases precompile,sweep,exact,bench]

Phases: ``precompile`` builds every swept configuration in parallel worker processes (they share
Triton's disk cache); ``sweep`` times all wide candidates per (shape, M); ``exact`` checks the
kernel bit-exact (mm) and against the reference (linear) over many M; ``bench`` times the tuned
kernel (the path the backend uses) and cuBLAS bf16 with ``do_bench`` (L2 flushed) and with CUDA
graphs whose replays rotate over enough weight copies to exceed the L2 cache.  Needs no torchao.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch
import triton

from quantvla_fx.kernel_support import m_bucket
from quantvla_fx.kernels import timing
from quantvla_fx.kernels.reference import ReferenceKernel
from quantvla_fx.kernels.triton.kernel import TritonW4A8Kernel
from quantvla_fx.kernels.triton.launch import TileConfig, launch
from quantvla_fx.kernels.triton.tiles import candidates
from quantvla_fx.kernels.triton.tune import random_problem, time_configs
from quantvla_fx.models.pi05.config import Pi05Config

SHAPES = Pi05Config.pi05_libero().mlp_gemm_shapes()  # name: (N, K)
BENCH_M = (10, 50, 968)
EXACT_M = (1, 10, 50, 968, 1024, 1500)
L2_ROTATE_BYTES = 256 << 20  # weight copies per graph replay: more bytes than the 60 MB L2


def _compile_key(cfg: TileConfig) -> tuple:
    d = cfg.to_dict()
    return tuple(sorted(d.items()))


def _precompile_worker(items):
    torch.cuda.set_device(0)
    done = 0
    for n, k, cfg, scaled in items:
        try:
            x, w = random_problem(16, n, k, "cuda")
            launch(x, w, TileConfig.from_dict(cfg))
            if scaled:
                xs = torch.ones(16, 1, device="cuda")
                launch(x, w, TileConfig.from_dict(cfg), xs, torch.ones(n, device="cuda"), None, torch.bfloat16)
            done += 1
        except Exception as e:  # reported again, with its reason, by the sweep
            print(f"precompile {cfg}: {type(e).__name__}: {str(e)[-300:]}", flush=True)
    torch.cuda.synchronize()
    return done


def sweep_plan(sms: int) -> list[tuple[str, int, TileConfig]]:
    plan = []
    for name, (n, k) in SHAPES.items():
        for m in BENCH_M:
            for cfg in candidates(n, k, m_bucket(m), sms, wide=True):
                plan.append((name, m, cfg))
    return plan


def phase_precompile(sms: int, workers: int) -> dict:
    t0 = time.time()
    uniq = {}
    for name, (n, k) in SHAPES.items():  # what the tuner times for the fused-epilogue kernel
        for m in BENCH_M + EXACT_M:
            for cfg in candidates(n, k, m_bucket(m), sms):
                uniq.setdefault(_compile_key(cfg), (n, k, cfg.to_dict(), True))
    for name, m, cfg in sweep_plan(sms):
        n, k = SHAPES[name]
        uniq.setdefault(_compile_key(cfg), (n, k, cfg.to_dict(), False))
    items = list(uniq.values())
    chunks = [items[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        done = sum(pool.map(_precompile_worker, chunks))
    return {"configs": len(items), "built": done, "seconds": round(time.time() - t0, 1)}


def phase_sweep(sms: int, deadline: float) -> dict:
    rows = []
    plan = sweep_plan(sms)
    by_point: dict[tuple, list[TileConfig]] = {}
    for name, m, cfg in plan:
        by_point.setdefault((name, m), []).append(cfg)
    for (name, m), cfgs in by_point.items():
        if time.time() > deadline:
            rows.append({"shape": name, "m": m, "skipped": "time budget"})
            continue
        n, k = SHAPES[name]
        x, w = random_problem(m, n, k, "cuda")
        for cfg, us, note in time_configs(x, w, cfgs):
            rows.append({"shape": name, "m": m, "config": cfg.key(), "us": us, "note": note})
        best = min((r for r in rows if r.get("shape") == name and r.get("m") == m and r.get("us")), key=lambda r: r["us"], default=None)
        print(f"sweep {name:15s} M={m:4d} best {best and best['config']} {best and round(best['us'], 2)} us", flush=True)
    return {"rows": rows}


def _linear_ref_check(kern, x, w, n, device, out_dtype, bias):
    xs = torch.rand(x.shape[0], 1, device=device) * 0.02 + 1e-3
    wsc = torch.rand(n, device=device) * 0.02 + 1e-3
    got = kern.linear(x, xs, w, wsc, bias, out_dtype)
    ref = ReferenceKernel().linear(x, xs, w, wsc, bias, torch.float64 if out_dtype == torch.float32 else torch.float32)
    err = ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
    return err, bool(torch.isfinite(got).all())


def phase_exact(kern: TritonW4A8Kernel) -> dict:
    rows, ok = [], True
    ref = ReferenceKernel()
    for name, (n, k) in SHAPES.items():
        for m in EXACT_M:
            x, w = random_problem(m, n, k, "cuda")
            got = kern.mm(x, w)
            exp = ref.mm(x, w)
            mism = int((got != exp).sum())
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            e32, f32 = _linear_ref_check(kern, x, w, n, "cuda", torch.float32, None)
            e16, f16 = _linear_ref_check(kern, x, w, n, "cuda", torch.bfloat16, bias)
            good = mism == 0 and e32 <= 1e-5 and e16 <= 2**-7 and f32 and f16
            ok &= good
            cfg = kern.config_for(n, k, m, x.device, scaled=True)
            rows.append({"shape": name, "m": m, "config": cfg.key(), "mm_config": kern.config_for(n, k, m, x.device).key(), "mm_mismatches": mism,
                         "linear_fp32_rel_err": e32, "linear_bf16_bias_rel_err": e16, "ok": good})
            print(f"exact {name:15s} M={m:5d} {cfg.key():34s} mm mismatches {mism} fp32 {e32:.2e} bf16+bias {e16:.2e}", flush=True)
    # Ragged shapes and every code path (split-K scaled, both nibble pairings, masked K tail).
    for (m, n, k) in [(37, 1000, 1000), (3, 200, 4160), (130, 96, 192)]:
        x, w = random_problem(m, n, k, "cuda")
        # A non-contiguous activation view: every other row of a taller tensor.
        xt = torch.randint(-127, 128, (2 * m, k), dtype=torch.int8, device="cuda")
        xt[::2] = x
        xv = xt[::2]
        exp = ref.mm(x, w)
        for cfg in [TileConfig(64, 16, 64, 1, 4, 3, False), TileConfig(64, 16, 64, 4, 4, 3, True),
                    TileConfig(128, 64, 128, 3, 4, 4, False), TileConfig(128, 128, 64, 2, 8, 3, True)]:
            got = launch(xv, w, cfg)
            mism = int((got != exp).sum())
            xs = torch.rand(m, 1, device="cuda") + 0.5
            wsc = torch.rand(n, device="cuda") + 0.5
            lin = launch(xv, w, cfg, xs, wsc, None, torch.float32)
            lref = ref.linear(x, xs, w, wsc, None, torch.float32)
            e = ((lin - lref).abs().max() / lref.abs().max()).item()
            good = mism == 0 and e <= 1e-5
            ok &= good
            rows.append({"shape": f"{m}x{n}x{k}", "m": m, "config": cfg.key(), "mm_mismatches": mism, "linear_fp32_rel_err": e, "ok": good})
            print(f"exact ragged M={m} N={n} K={k} {cfg.key():34s} mismatches {mism} fp32 {e:.2e}", flush=True)
    return {"all_ok": ok, "rows": rows}


def _graph_us(fns, expect=None, reps: int = 30) -> tuple[float, bool]:
    """Per-call µs of one CUDA graph that calls every fn once (distinct weights: L2 cold)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [f() for f in fns]
    g.replay()
    torch.cuda.synchronize()
    good = True if expect is None else all(torch.equal(o, e) for o, e in zip(outs, expect))
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000.0 / (reps * len(fns)))
    del g
    return statistics.median(times), good


def _bench_ms(fn) -> float:
    return timing.median_us(fn, "cuda", warmup_ms=10, rep_ms=60) / 1000


def phase_bench(kern: TritonW4A8Kernel) -> dict:
    rows = []
    ref = ReferenceKernel()
    for name, (n, k) in SHAPES.items():
        for m in BENCH_M:
            x, w = random_problem(m, n, k, "cuda")
            cfg = kern.config_for(n, k, m, x.device, scaled=True)
            xs = torch.rand(m, 1, device="cuda") * 0.02 + 1e-3
            wsc = torch.rand(n, device="cuda") * 0.02 + 1e-3
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            r = {"shape": name, "n": n, "k": k, "m": m, "config": cfg.key(), "mm_config": kern.config_for(n, k, m, x.device).key()}
            r["bf16_us"] = _bench_ms(lambda: xb @ wb.t()) * 1000
            r["mm_us"] = _bench_ms(lambda: kern.mm(x, w)) * 1000
            r["linear_us"] = _bench_ms(lambda: kern.linear(x, xs, w, wsc, None, torch.bfloat16)) * 1000
            # Graph replays over rotating weight copies (same activations, as in a model).
            cb = max(1, min(64, math.ceil(L2_ROTATE_BYTES / wb.numel() / 2)))
            ci = max(1, min(256, math.ceil(L2_ROTATE_BYTES / w.numel())))
            wbs = [wb.clone() for _ in range(cb)]
            ws_ = [w.clone() for _ in range(ci)]
            r["bf16_graph_us"], _ = _graph_us([lambda wi=wi: xb @ wi.t() for wi in wbs])
            exp = [ref.mm(x, w)] * ci
            r["mm_graph_us"], r["mm_graph_exact"] = _graph_us([lambda wi=wi: kern.mm(x, wi) for wi in ws_], exp)
            r["linear_graph_us"], _ = _graph_us([lambda wi=wi: kern.linear(x, xs, wi, wsc, None, torch.bfloat16) for wi in ws_])
            r["weight_copies"] = {"bf16": cb, "int4": ci}
            for key in ("mm", "linear"):
                r[f"{key}_speedup"] = r["bf16_us"] / r[f"{key}_us"]
                r[f"{key}_graph_speedup"] = r["bf16_graph_us"] / r[f"{key}_graph_us"]
            del wbs, ws_
            torch.cuda.empty_cache()
            rows.append(r)
            print(f"bench {name:15s} M={m:4d} bf16 {r['bf16_us']:7.2f}/{r['bf16_graph_us']:7.2f}  "
                  f"linear {r['linear_us']:7.2f}/{r['linear_graph_us']:7.2f} ({r['linear_speedup']:.2f}x/{r['linear_graph_speedup']:.2f}x)  "
                  f"mm {r['mm_us']:7.2f}/{r['mm_graph_us']:7.2f}  {cfg.key()}", flush=True)
    return {"rows": rows}


def print_table(rows):
    print("\nus (do_bench L2-flushed / CUDA graph, L2-cold weights); speedup = bf16 / triton linear(bf16 out)")
    print(f"{'GEMM':16s} {'M':>5s} {'bf16':>15s} {'triton linear':>15s} {'speedup':>13s} {'triton mm':>15s}  config")
    for r in rows:
        print(f"{r['shape']:16s} {r['m']:5d} {r['bf16_us']:6.1f} / {r['bf16_graph_us']:6.1f} {r['linear_us']:6.1f} / {r['linear_graph_us']:6.1f} "
              f"{r['linear_speedup']:5.2f} / {r['linear_graph_speedup']:5.2f} {r['mm_us']:6.1f} / {r['mm_graph_us']:6.1f}  {r['config']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", default="precompile,sweep,exact,bench")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--sweep-seconds", type=float, default=240)
    args = ap.parse_args()
    phases = args.phases.split(",")
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    res = {"gpu": torch.cuda.get_device_name(0), "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "cache_dir": os.environ.get("QUANTVLA_CACHE_DIR"), "phases": {}}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    t0 = time.time()
    if "precompile" in phases:
        res["phases"]["precompile"] = phase_precompile(sms, args.workers)
        print("precompile", res["phases"]["precompile"], flush=True)
        save()
    if "sweep" in phases:
        res["phases"]["sweep"] = phase_sweep(sms, time.time() + args.sweep_seconds)
        save()
    kern = TritonW4A8Kernel()
    if "exact" in phases:
        res["phases"]["exact"] = phase_exact(kern)
        print("exact all_ok", res["phases"]["exact"]["all_ok"], flush=True)
        save()
    if "bench" in phases:
        res["phases"]["bench"] = phase_bench(kern)
        save()
        print_table(res["phases"]["bench"]["rows"])
    res["seconds"] = round(time.time() - t0, 1)
    save()
    if "exact" in phases and not res["phases"]["exact"]["all_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
