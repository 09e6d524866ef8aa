"""Per-op benchmark: RMSNorm -> linear on the four Pi0.5 MLP shapes, quantvla vs Inductor bf16.

    python benchmarks/bench_ops.py [--kernels triton,bitblas,auto,w4a16_triton] [--ms 1,10,50,968] [--out benchmarks/results]

For every shape and M in {10, 50, 968} (``--ms``): the same module compiled with Inductor in bf16 and
with backend="quantvla" (one run per kernel; ``w4a16_<kernel>``: weight-only W4A16, group
``--w4a16-group``, default 128 as the seeds), plus raw cuBLAS bf16 (F.linear), all timed in this run
by quantvla_fx/kernels/timing.py (CUDA graphs, L2 flushed, medians).  Prints ratios; writes
<out>/<gpu>/bench_ops.json.  benchmarks/plot_results.py draws the PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F

from quantvla_fx import QuantVLAConfig
from quantvla_fx.kernels.timing import graph_us
from quantvla_fx.models.pi05.config import Pi05Config
from quantvla_fx.testing import NormLinear

SHAPES = Pi05Config.pi05_libero().mlp_gemm_shapes()  # name: (N, K)
MS = (10, 50, 968)


def gpu_slug() -> str:
    return torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "_")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="triton,bitblas")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts M")
    ap.add_argument("--w4a16-group", type=int, default=128, help="weight group of the w4a16_* kernels (-1: per channel)")
    args = ap.parse_args()
    torch.manual_seed(0)
    # One module class, many shapes and backends: keep every variant compiled (never eager).
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for name in args.shapes.split(","):
        torch._dynamo.reset()
        n, k = SHAPES[name]
        mod = NormLinear(k, n).cuda().to(torch.bfloat16).eval()
        with torch.no_grad():
            mod.proj.weight.normal_(0, k ** -0.5)
            mod.norm.weight.normal_(0, 0.1)
        compiled = {"inductor_bf16": torch.compile(mod)}
        for kern in args.kernels.split(","):
            if kern.startswith("w4a16_"):
                cfg = QuantVLAConfig.all_linears(scheme="w4a16", kernel=kern[len("w4a16_"):],
                                                 w4a16_group_size=args.w4a16_group)
            else:
                cfg = QuantVLAConfig.all_linears(kernel=kern)
            compiled[f"quantvla_{kern}"] = torch.compile(mod, backend="quantvla", options=cfg.to_options())
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "K": k, "N": n, "M": m}
            with torch.no_grad():
                xn = mod.norm(x)
                row["cublas_bf16_us"] = graph_us(lambda: F.linear(xn, mod.proj.weight))
                ref = mod(x).float()
                for label, fn in compiled.items():
                    try:
                        out = fn(x)
                        err = float((out.float() - ref).norm() / ref.norm())
                        row[f"{label}_us"] = graph_us(lambda: fn(x))
                        row[f"{label}_rel_err"] = err
                    except Exception as e:  # a kernel that cannot run here is reported, not fatal
                        row[f"{label}_error"] = f"{type(e).__name__}: {e}"[:300]
            base = row["inductor_bf16_us"]
            for key in list(row):
                if key.startswith("quantvla_") and key.endswith("_us"):
                    row[key[:-3] + "_speedup_vs_inductor_bf16"] = base / row[key] if row[key] else None
                    row[key[:-3] + "_speedup_vs_cublas_bf16"] = row["cublas_bf16_us"] / row[key] if row[key] else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    out_dir = os.path.join(args.out, gpu_slug())
    os.makedirs(out_dir, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "method": "CUDA-graph replay, L2 flushed (256 MiB write) each replay, flush time subtracted, median of 200"}
    with open(os.path.join(out_dir, "bench_ops.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\nshape            M   cuBLAS  inductor " + " ".join(f"{k:>16}" for k in compiled if k != "inductor_bf16"))
    for r in rows:
        cells = []
        for k in compiled:
            if k == "inductor_bf16":
                continue
            us = r.get(f"{k}_us")
            cells.append(f"{us:7.1f}us {r['inductor_bf16_us'] / us:5.2f}x" if us else f"{'error':>16}")
        print(f"{r['shape']:15} {r['M']:4} {r['cublas_bf16_us']:7.1f} {r['inductor_bf16_us']:8.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
