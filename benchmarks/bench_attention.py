"""Attention at Pi0.5's shapes: SDPA in the model's layout against quantvla::attention's kernels.

    python benchmarks/bench_attention.py [--out benchmarks/results]

Cases (bf16, one H200-class GPU): the expert (8 query heads over 1 KV head, D=256) with 10 and 50
action tokens over the prefix + action keys, the 968-token prefix with query + key padding, and
SigLIP (3 cameras x 16 heads x 256 patches, D=72, no mask).  ``sdpa_model_layout`` is what our
Pi05 runs (query heads folded into rows, additive (B, 1, 8*Lq, Lk) mask, F.scaled_dot_product_attention's
default backend); SigLIP is plain SDPA.  Every number is quantvla_fx/kernels/timing.py's graph_us
(CUDA-graph replay, L2 flushed, median); every kernel's output is also checked against the fp32
reference (SQNR, dB).  Writes <out>/<gpu>/bench_attention.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F
from torchao.quantization.utils import compute_error

import quantvla_fx.ops  # noqa: F401
from quantvla_fx.attention_support import MASK_VALUE, auto_choice
from quantvla_fx.kernels.attention import reference, torch_fused, triton_flash, triton_splitkv
from quantvla_fx.kernels.timing import graph_us

PREFIX = 968  # 3 cameras x 256 + 200 prompt tokens
VALID_PROMPT = 48  # prompt tokens that are not padding


def gpu_slug() -> str:
    return torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "_")


def prefix_valid(b: int) -> torch.Tensor:
    pad = torch.zeros(b, PREFIX, dtype=torch.bool, device="cuda")
    pad[:, : 768 + VALID_PROMPT] = True
    return pad


def case(name: str):
    """(q, k, v, key_valid, query_valid, scale) in the op's layout."""
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    if name.startswith("expert"):
        lq = int(name.split("_q")[1])
        kv = torch.cat([prefix_valid(1), torch.ones(1, lq, dtype=torch.bool, device="cuda")], 1)
        q = torch.randn(1, 8, lq, 256, **bf)
        k, v = torch.randn(1, 1, PREFIX + lq, 256, **bf), torch.randn(1, 1, PREFIX + lq, 256, **bf)
        return q, k, v, kv, None, 256 ** -0.5
    if name == "prefix_968":
        pad = prefix_valid(1)
        q = torch.randn(1, 8, PREFIX, 256, **bf)
        k, v = torch.randn(1, 1, PREFIX, 256, **bf), torch.randn(1, 1, PREFIX, 256, **bf)
        return q, k, v, pad, pad, 256 ** -0.5
    q, k, v = (torch.randn(3, 16, 256, 72, **bf) for _ in range(3))
    return q, k, v, None, None, 72 ** -0.5


def model_layout_sdpa(q, k, v, kv, qv, scale):
    """What Pi05's attention() runs: heads folded into rows + an additive mask repeated per head."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if kv is None and qv is None and hq == hkv:
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = reference.additive_mask(kv, qv, b, lq, k.shape[2], q.device).repeat(1, 1, hq // hkv, 1).to(q.dtype)
    qf = q.reshape(b, hkv, (hq // hkv) * lq, d)
    return lambda: F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)


SWEEP = {
    "splitkv": [dict(block_m=m, block_n=n, num_warps=w) for m in (16, 32, 64) for n in (32, 64) for w in (4, 8)],
    "flash": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w) for m in (32, 64, 128) for n in (32, 64) for w in (4, 8)],
}
SWEEP_CASES = {"splitkv": ("expert_q10", "expert_q50", "prefix_968"), "flash": ("prefix_968", "siglip")}


def sweep(name, q, k, v, kv, qv, scale, ref) -> dict:
    """{kernel: {config: µs}} for the configurations that compile, fit and are correct."""
    impls = {"splitkv": triton_splitkv.attention, "flash": triton_flash.attention}
    found = {}
    for kern, cfgs in SWEEP.items():
        if name not in SWEEP_CASES[kern]:
            continue
        found[kern] = {}
        for cfg in cfgs:
            key = ",".join(f"{a}={b}" for a, b in cfg.items())
            try:
                fn = lambda cfg=cfg: impls[kern](q, k, v, kv, qv, scale, **cfg)  # noqa: E731
                if compute_error(ref, fn().float()).item() < 40:
                    found[kern][key] = "wrong"
                    continue
                found[kern][key] = round(graph_us(fn, reps=100), 2)
            except Exception as e:  # too much shared memory etc.
                found[kern][key] = f"{type(e).__name__}"
        best = min((t, c) for c, t in found[kern].items() if isinstance(t, float))
        print(f"  sweep {name} {kern}: best {best[1]} {best[0]} us", flush=True)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cases", default="expert_q10,expert_q50,prefix_968,siglip")
    ap.add_argument("--sweep", action="store_true", help="also time a small grid of tile configurations per kernel")
    args = ap.parse_args()
    assert MASK_VALUE < 0
    results = {}
    for name in args.cases.split(","):
        q, k, v, kv, qv, scale = case(name)
        ref = reference.attention(q.float(), k.float(), v.float(), kv, qv, scale)
        runs = {
            "sdpa_model_layout": model_layout_sdpa(q, k, v, kv, qv, scale),
            "quantvla_auto": lambda: torch.ops.quantvla.attention(q, k, v, kv, qv, scale, "auto"),
            "splitkv": lambda: triton_splitkv.attention(q, k, v, kv, qv, scale),
            "flash": lambda: triton_flash.attention(q, k, v, kv, qv, scale),
        }
        if kv is None and qv is None:  # PyTorch's fused SDPA behind the op runs unpadded calls only
            runs["torch"] = lambda: torch_fused.attention(q, k, v, kv, qv, scale)
        row = {"shape": {"B": q.shape[0], "Hq": q.shape[1], "Hkv": k.shape[1], "Lq": q.shape[2], "Lk": k.shape[2],
                         "D": q.shape[3], "key_padding": kv is not None, "query_padding": qv is not None},
               "auto_kernel": auto_choice(q.device, q.dtype, q.shape[2], q.shape[3], kv is not None or qv is not None), "us": {}, "sqnr_db_vs_fp32": {}}
        for variant, fn in runs.items():
            out = fn()
            if variant == "sdpa_model_layout" and out.shape != ref.shape:
                out = out.reshape(ref.shape)
            row["sqnr_db_vs_fp32"][variant] = round(compute_error(ref, out.float()).item(), 2)
            row["us"][variant] = round(graph_us(fn), 2)
        row["speedup_auto_vs_sdpa"] = round(row["us"]["sdpa_model_layout"] / row["us"]["quantvla_auto"], 2)
        if args.sweep:
            row["sweep_us"] = sweep(name, q, k, v, kv, qv, scale, ref)
        results[name] = row
        print(f"{name:12s} " + "  ".join(f"{k} {t:8.2f} us ({row['sqnr_db_vs_fp32'][k]:.0f} dB)" for k, t in row["us"].items())
              + f"  auto={row['auto_kernel']} x{row['speedup_auto_vs_sdpa']}", flush=True)
    import triton

    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "timing": "quantvla_fx.kernels.timing.graph_us (CUDA graph, L2 flushed, median)",
           "cases": results}
    path = os.path.join(args.out, gpu_slug())
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "bench_attention.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", os.path.join(path, "bench_attention.json"))


if __name__ == "__main__":
    main()
