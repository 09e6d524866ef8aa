"""W4A16 vs W4A8 accuracy on openpi's golden tiny Pi0.5, on the CPU (issue 16).

    python benchmarks/w4a16_accuracy_cpu.py [--out benchmarks/results/cpu/w4a16_accuracy.json] [--search]

* Action SQNR (torchao's compute_error, dB, vs the float model) of ``sample_actions`` compiled with
  the quantvla backend: W4A8 and W4A16, round-to-nearest and DuQuant (calibrated on 4 jittered
  observations, evaluated on the golden one; with and without smoothing; ``--search`` adds the searched + GPTQ packs), on the
  seeds' selection (LM + expert MLPs) and on every linear.
* Per-linear output SQNR of the 12 MLP linears on their real inputs (captured from the float run,
  all calls): W4A8 (int8 per token × int4 per channel), W4A16 symmetric (per channel, group 32),
  W4A16 asymmetric (zero points; fake-quantized with torchao's affine primitives) — the
  measurement behind "symmetric is enough".
* Action SQNR of W4A16 with asymmetric weights (fake-quantized in the eager model).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.backend import report_book
from quantvla_fx.models.pi05 import Observation, Pi05
from quantvla_fx.models.pi05.observation import jittered
from quantvla_fx.quant.activations import dequantize_per_token, quantize_per_token
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine
from torchao.quantization.utils import compute_error

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "pi05_tiny"


def fake_sym(w: torch.Tensor, group: int) -> torch.Tensor:
    return dequantize_weight(*quantize_weight_int4(w, group if group > 0 and group < w.shape[1] else -1))


def fake_asym(w: torch.Tensor, group: int) -> torch.Tensor:
    """uint4 [0, 15] with a zero point per channel/group (torchao's ASYMMETRIC mapping)."""
    g = group if group > 0 and group < w.shape[1] else w.shape[1]
    wf = w.detach().float()
    scale, zero = choose_qparams_affine(wf, MappingType.ASYMMETRIC, (1, g), torch.uint8, 0, 15, eps=1e-8,
                                        scale_dtype=torch.float32, zero_point_dtype=torch.float32)
    q = quantize_affine(wf, (1, g), scale, zero, torch.uint8, 0, 15)
    return dequantize_affine(q, (1, g), scale, zero, torch.uint8, 0, 15, output_dtype=torch.float32)


def actions_compiled(policy, obs, noise, cfg: QuantVLAConfig) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(policy.sample_actions, backend="quantvla", options=cfg.to_options())(obs, noise=noise)


def actions_with_weights(policy, obs, noise, fqns, fn) -> torch.Tensor:
    """Eager actions with the weights of ``fqns`` replaced by fn(weight) (restored after)."""
    mods = dict(policy.named_modules())
    saved = {f: mods[f].weight.detach().clone() for f in fqns}
    try:
        with torch.no_grad():
            for f in fqns:
                mods[f].weight.copy_(fn(saved[f]).to(saved[f].dtype))
            return policy.sample_actions(obs, noise=noise)
    finally:
        with torch.no_grad():
            for f in fqns:
                mods[f].weight.copy_(saved[f])


def mlp_inputs(policy, obs, noise, fqns) -> dict:
    """Each selected linear's inputs over every call of the float run, as [rows, K]."""
    rows: dict = {f: [] for f in fqns}
    mods = dict(policy.named_modules())
    hooks = [mods[f].register_forward_pre_hook(lambda m, a, f=f: rows[f].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for f in fqns]
    try:
        with torch.no_grad():
            policy.sample_actions(obs, noise=noise)
    finally:
        for h in hooks:
            h.remove()
    return {f: torch.cat(r) for f, r in rows.items()}


def per_linear(policy, inputs: dict) -> list[dict]:
    mods = dict(policy.named_modules())
    out = []
    for f, x in inputs.items():
        w = mods[f].weight.detach().float()
        x = x.float()
        ref = x @ w.t()
        xq = dequantize_per_token(*quantize_per_token(x))
        row = {"linear": f, "NxK": f"{w.shape[0]}x{w.shape[1]}", "rows": x.shape[0],
               "w4a8": float(compute_error(ref, xq @ fake_sym(w, -1).t())),
               "w4a16": float(compute_error(ref, x @ fake_sym(w, -1).t())),
               "w4a16_g32": float(compute_error(ref, x @ fake_sym(w, 32).t())),
               "w4a16_asym": float(compute_error(ref, x @ fake_asym(w, -1).t())),
               "w4a16_asym_g32": float(compute_error(ref, x @ fake_asym(w, 32).t()))}
        out.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cpu/w4a16_accuracy.json")
    ap.add_argument("--golden", default=str(GOLDEN), help="a Pi0.5 checkpoint folder with inputs.safetensors")
    ap.add_argument("--search", action="store_true", help="also the searched (GPTQ) packs (minutes)")
    ap.add_argument("--lowering", default="eager", choices=("eager", "inductor"),
                    help="eager: the rewritten graph without Inductor (same kernels and math, faster to compile)")
    args = ap.parse_args()
    torch.manual_seed(0)
    golden = Path(args.golden)
    policy = Pi05.from_pretrained(golden).eval()
    obs = Observation.from_safetensors(golden / "inputs.safetensors")
    noise = load_file(str(golden / "inputs.safetensors"))["noise"]
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    mlp = QuantVLAConfig.pi05_mlp(lowering=args.lowering)
    every = QuantVLAConfig.all_linears(lowering=args.lowering)
    t0 = time.time()
    batches = [(jittered(obs, s),) for s in range(4)]
    run = lambda m, b: m.sample_actions(*b, noise=noise)  # noqa: E731
    packs = {"rtn": None,
             "duquant": calibrate(policy, batches, mlp, run=run, block_size=32, progress=False, search=False),
             # rotations only (no smoothing: it moves activation range into the weights, which
             # weight-only quantization then pays for)
             "duquant_rot_only": calibrate(policy, batches, mlp, run=run, block_size=32, progress=False, alpha=None,
                                           search=False)}
    if args.search:
        packs["searched_gptq"] = calibrate(policy, batches, mlp, run=run, block_size=32, progress=False,
                                           search=True, weight_rounding="gptq")
    calib_s = time.time() - t0
    actions = {}
    for pname, p in packs.items():
        for scheme in ("w4a8", "w4a16"):
            a = actions_compiled(policy, obs, noise, mlp.replace(scheme=scheme, packs=p))
            actions[f"mlp_{scheme}_{pname}"] = round(float(compute_error(ref, a)), 2)
            print(f"mlp {scheme} {pname}: {actions[f'mlp_{scheme}_{pname}']} dB", flush=True)
    for scheme, extra in (("w4a8", {}), ("w4a16", {}), ("w4a16", {"w4a16_group_size": 32})):
        a = actions_compiled(policy, obs, noise, every.replace(scheme=scheme, **extra))
        key = f"all_{scheme}" + ("_g32" if extra else "") + "_rtn"
        actions[key] = round(float(compute_error(ref, a)), 2)
        print(key, actions[key], "dB", flush=True)
    a = actions_compiled(policy, obs, noise, mlp.replace(scheme="w4a16", w4a16_group_size=32))
    actions["mlp_w4a16_g32_rtn"] = round(float(compute_error(ref, a)), 2)
    selected = [r.fqn for r in report_book(None).graphs[-1].quantized]
    fqns = list(dict.fromkeys(selected))
    for name, fn in (("sym", lambda w: fake_sym(w, -1)), ("asym", lambda w: fake_asym(w, -1)),
                     ("sym_g32", lambda w: fake_sym(w, 32)), ("asym_g32", lambda w: fake_asym(w, 32))):
        actions[f"mlp_w4a16_{name}_fake_eager"] = round(float(compute_error(ref, actions_with_weights(
            policy, obs, noise, fqns, fn))), 2)
    table = per_linear(policy, mlp_inputs(policy, obs, noise, fqns))
    result = {"model": str(golden), "device": "cpu", "torch": torch.__version__,
              "lowering": args.lowering, "calibration_s": round(calib_s, 1),
              "note": "tiny K (32-128) <= 128: the default W4A16 group (128) is one group per row here",
              "action_sqnr_db": actions, "per_linear_output_sqnr_db": table}
    print(json.dumps(actions, indent=1))
    keys = [k for k in table[0] if k not in ("linear", "NxK", "rows")]
    print("| linear | N×K | " + " | ".join(keys) + " |")
    for r in table:
        print(f"| {r['linear'].replace('paligemma_with_expert.', '')} | {r['NxK']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
