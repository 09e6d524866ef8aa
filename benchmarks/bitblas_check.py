"""GPU proof for the bitblas kernel: our in-process compute_80 compile override (no nvcc wrapper),
exact int32 results on the Pi0.5 shapes, build and cache-load times, speed against cuBLAS bf16,
and what ``auto`` picks.

    python benchmarks/bitblas_check.py --out benchmarks/results/h200/bitblas_raw.json

Needs BitBLAS 0.1.0.post1 importable (on a CUDA-13 machine also the nvidia-cuda-runtime-cu12
wheel somewhere on sys.path or in QUANTVLA_CUDA12_LIB_DIRS).  Needs no torchao.  The BitBLAS
settings come from ``OPENPI_BITBLAS_ENABLE_TUNING`` / ``OPT_M`` (read by QuantVLAConfig.from_env,
as a compile reads them).  Timings: kernels/timing.median_us (triton.testing.do_bench medians,
which flush the L2 before every run).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quantvla_fx import QuantVLAConfig  # noqa: E402
from quantvla_fx.kernel_support import KernelSettings  # noqa: E402
from quantvla_fx.kernels import timing  # noqa: E402
from quantvla_fx.kernels.bitblas import build as bitblas_build  # noqa: E402
from quantvla_fx.kernels.bitblas import env as bitblas_env  # noqa: E402
from quantvla_fx.kernels.bitblas import kernel as bb  # noqa: E402
from quantvla_fx.kernels.registry import get_kernel  # noqa: E402
from quantvla_fx.kernels.select import Selector  # noqa: E402
from quantvla_fx.models.pi05.config import Pi05Config  # noqa: E402
from quantvla_fx.quant.int4_pack import pack_int4  # noqa: E402

SHAPES = Pi05Config.pi05_libero().mlp_gemm_shapes()  # name: (N, K)


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _nvcc_facts() -> dict:
    """Which nvcc BitBLAS will run, and whether it is the old PATH wrapper (it must not be)."""
    path = shutil.which("nvcc")
    wrapper = False
    if path:
        with open(path, "rb") as f:
            wrapper = b"NVCC_REWRITE" in f.read(200_000)
    return {"nvcc": path, "nvcc_realpath": path and os.path.realpath(path), "nvcc_is_ptx80_wrapper": wrapper,
            "NVCC_REWRITE": os.environ.get("NVCC_REWRITE"),
            "carry_bin_on_PATH": any(p.rstrip("/").endswith(".carry/bin") for p in os.environ["PATH"].split(":"))}


def _bench(fn) -> float:
    return timing.median_us(fn, "cuda", warmup_ms=25, rep_ms=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache-dir", default=None, help="BitBLAS operator cache (default: a fresh temp dir)")
    ap.add_argument("--exact-ms", default="1,10,50,968,1024,1500")
    ap.add_argument("--bench-ms", default="10,50,968")
    ap.add_argument("--auto-buckets", default="16,64,1024")
    ap.add_argument("--auto-candidates", default="bitblas,reference")
    ap.add_argument("--debug-log", default=None, help="write BitBLAS's DEBUG log here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.debug_log:
        bl = logging.getLogger("bitblas")
        bl.handlers[:] = [logging.FileHandler(args.debug_log)]
        bl.setLevel(logging.DEBUG)

    dev = torch.device("cuda")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="qv_bitblas_")
    fresh = not os.path.exists(cache) or not os.listdir(cache)
    os.environ["QUANTVLA_BITBLAS_CACHE"] = cache
    # OPENPI_BITBLAS_ENABLE_TUNING / OPT_M, read as a compile reads them.
    kern = bb.kernel_for(KernelSettings.of(QuantVLAConfig.from_env(kernel="bitblas")))
    res = {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
           "cache_dir": cache, "cache_was_empty": fresh, "opt_m": list(bb.opt_m(kern.settings)),
           "enable_tuning": kern.settings.enable_tuning, "nvcc_before": _nvcc_facts(),
           "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH")}

    t0 = time.perf_counter()
    reason = kern.unavailable_reason(dev)
    res["import_seconds"] = round(time.perf_counter() - t0, 2)
    res["env"] = dict(bitblas_env.INFO)
    res["nvcc_after"] = _nvcc_facts()
    if reason:
        res["unavailable"] = reason
        print(json.dumps(res, indent=1))
        return 1
    import bitblas

    res["bitblas_version"] = getattr(bitblas, "__version__", "?")

    ref = get_kernel("reference")
    res["shapes"] = {}
    for name, (n, k) in SHAPES.items():
        t0 = time.perf_counter()
        why = kern.unsupported_reason(n, k, -1, dev)  # builds + self-checks on first use
        res["shapes"][name] = {"N": n, "K": k, "refused": why, "build_seconds": kern.build_seconds.get((n, k)),
                               "build_and_check_seconds": round(time.perf_counter() - t0, 2)}
    res["compile_override_calls"] = dict(bitblas_build.COMPILE_CALLS)

    for name, (n, k) in SHAPES.items():
        row = res["shapes"][name]
        if row["refused"]:
            continue
        w = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev))
        row["exact"] = {}
        for m in _ints(args.exact_ms):
            x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
            got, want = kern.mm(x, w), ref.mm(x, w)
            row["exact"][str(m)] = int((got != want).sum())  # number of wrong int32 outputs
        w_bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ws = torch.rand(n, device=dev) / 100
        row["timing_us"] = {}
        for m in _ints(args.bench_ms):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
            xs = torch.rand(m, 1, device=dev) / 100
            xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_mm = _bench(lambda: kern.mm(x, w))
            t_lin = _bench(lambda: kern.linear(x, xs, w, ws, None, torch.bfloat16))
            t_bf16 = _bench(lambda: torch.nn.functional.linear(xb, w_bf16))
            row["timing_us"][str(m)] = {"bitblas_mm_int32": round(t_mm, 2), "bitblas_linear_bf16": round(t_lin, 2),
                                        "cublas_bf16": round(t_bf16, 2), "speedup_mm_vs_bf16": round(t_bf16 / t_mm, 3),
                                        "speedup_linear_vs_bf16": round(t_bf16 / t_lin, 3)}

    # A new kernel object = a new process's view: every operator comes from the on-disk cache.
    fresh_kernel = bb.BitBLASKernel(kern.settings)
    for name, (n, k) in SHAPES.items():
        t0 = time.perf_counter()
        why = fresh_kernel.unsupported_reason(n, k, -1, dev)
        res["shapes"][name]["cache_load_and_check_seconds"] = round(time.perf_counter() - t0, 2)
        res["shapes"][name]["cache_load_refused"] = why
        res["shapes"][name]["cache_load_rebuilt"] = (n, k) in fresh_kernel.build_seconds

    auto = Selector(candidates=args.auto_candidates.split(","), cache_dir=tempfile.mkdtemp(prefix="qv_auto_"))
    res["auto"] = {"candidates": list(auto.candidates)}
    for name, (n, k) in SHAPES.items():
        for mb in _ints(args.auto_buckets):
            res["auto"][f"{name}|M{mb}"] = auto.select(dev, n, k, mb, -1).name
    with open(auto.cache_path(res["device"])) as f:
        res["auto"]["cache_file"] = json.load(f)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)

    print(f"\n{res['device']}  torch {res['torch']}  nvcc {res['nvcc_after']['nvcc']} "
          f"(wrapper: {res['nvcc_after']['nvcc_is_ptx80_wrapper']})  overrides: {res['compile_override_calls']}")
    print(f"{'shape':16} {'N':>6} {'K':>6} {'build s':>8} {'load s':>7} {'wrong':>6} "
          f"{'M':>5} {'bitblas us':>11} {'+epilogue':>10} {'bf16 us':>8} {'x bf16':>7}")
    for name, row in res["shapes"].items():
        if row["refused"]:
            print(f"{name:16} refused: {row['refused']}")
            continue
        wrong = sum(row["exact"].values())
        for m, t in row["timing_us"].items():
            print(f"{name:16} {row['N']:6} {row['K']:6} {row['build_seconds'] or 0:8.1f} "
                  f"{row['cache_load_and_check_seconds']:7.1f} {wrong:6} {m:>5} {t['bitblas_mm_int32']:11.1f} "
                  f"{t['bitblas_linear_bf16']:10.1f} {t['cublas_bf16']:8.1f} {t['speedup_mm_vs_bf16']:7.2f}")
    print("auto:", {k: v for k, v in res["auto"].items() if k not in ("cache_file",)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
