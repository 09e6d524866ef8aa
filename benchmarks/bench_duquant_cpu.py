"""Online cost of DuQuant's rotations on the CPU toy model: kernels and time, RTN vs DuQuant.

    python benchmarks/bench_duquant_cpu.py [--tokens 256] [--dim 1024]

A Gemma-style toy (outlier channels injected) with its MLPs quantized W4A8, compiled with
backend="quantvla" four ways: round-to-nearest, DuQuant with smoothing folded (rotations online),
DuQuant with nothing folded, and the calibration search's per-group recipes (``--rounding``).  Prints, side by side from one run: output SQNR vs float, the
number of generated C++ kernels and extern calls (from Inductor's code), and the median latency.
"""
import argparse
import re
import statistics
import time

import torch
from torch._inductor.utils import run_and_get_code
from torchao.quantization.utils import compute_error

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.testing import ToyGemma, init_toy_gemma, inject_outlier_channels


def median_ms(fn, x, reps=20):
    for _ in range(3):
        fn(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--rounding", choices=("rtn", "gptq"), default="gptq", help="int4 rounding of the search")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = args.dim
    model = inject_outlier_channels(init_toy_gemma(ToyGemma(dim=d, hidden=4 * d, layers=2, heads=8, head_dim=d // 8))).eval()
    cfg = QuantVLAConfig(include=(r"mlp\.",))
    batches = [torch.randn(1, args.tokens, d) for _ in range(4)]
    packs = calibrate(model, batches, cfg, block_size=args.block, alpha=0.5, weight_clip=0.9, search=False)
    t0 = time.perf_counter()
    searched = calibrate(model, batches, cfg, block_size=args.block, search=True, weight_rounding=args.rounding)
    search_s = time.perf_counter() - t0
    x = torch.randn(1, args.tokens, d)
    with torch.no_grad():
        ref = model(x)
    variants = {"float (Inductor)": None, "RTN W4A8": cfg, "DuQuant W4A8, folded": cfg.replace(packs=packs),
                "DuQuant W4A8, unfolded": cfg.replace(packs=packs, duquant_fold=False),
                f"search W4A8 ({args.rounding})": cfg.replace(packs=searched)}
    print(f"toy Gemma d={d} ffn={4 * d} 2 layers, {args.tokens} tokens, block {args.block}, {torch.get_num_threads()} threads; "
          f"search calibration {search_s:.1f} s")
    print(f"{'variant':26} {'SQNR dB':>8} {'cpp kernels':>12} {'extern bmm/mm':>14} {'w4a8 ops':>9} {'ms':>8}")
    for name, c in variants.items():
        torch._dynamo.reset()
        fn = torch.compile(model) if c is None else torch.compile(model, backend="quantvla", options=c.to_options())
        with torch.no_grad():
            out, code = run_and_get_code(fn, x)
            code = "\n".join(code)
            kernels = len(re.findall(r"async_compile\.cpp_pybinding", code))
            mm = len(re.findall(r"extern_kernels\.(?:bmm|mm)\(", code))
            ops = code.count("torch.ops.quantvla.w4a8_linear.default(")
            ms = median_ms(fn, x)
        sqnr = float(compute_error(ref, out))
        print(f"{name:26} {sqnr:8.2f} {kernels:12d} {mm:14d} {ops:9d} {ms:8.2f}")


if __name__ == "__main__":
    main()
