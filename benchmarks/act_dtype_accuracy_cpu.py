"""fp8 (e4m3) vs int8 per-token activations in front of int4 weights: what each costs in accuracy.

    python benchmarks/act_dtype_accuracy_cpu.py               # golden tiny Pi0.5
    python benchmarks/act_dtype_accuracy_cpu.py --fullsize    # pi05_libero widths, 2 layers per stack

The kernel issue weighs an fp8 prefill kernel (Hopper pipelines fp8 dots with fp32 accumulators,
not int8 ones; int4 values -8..7 are exact in e4m3). This measures the accuracy side before any
kernel exists, with fake quantization in eager mode: every selected linear computes
``act_q(T(x)) @ dequant(int4(T_w(W)))^T + b``, where act_q is

- ``int8``: our per-token symmetric int8 (scale = absmax/127, quant/activations.py);
- ``fp8``: per-token scale absmax/448, cast to float8_e4m3fn (round to nearest even), back;
- ``none``: no activation quantization (= W4A16 at per-channel weights),

T / T_w the group's DuQuant transform (``--duquant``: one-recipe packs from calibrate(search=False)
on 4 jittered observations; else identity), int4 RTN per output channel. fp32 everywhere else.
Reported: action SQNR vs float (torchao's compute_error, dB) for the seeds' MLP selection and for
every linear, and each MLP linear's output SQNR on its own inputs. Writes a JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torchao.quantization.utils import compute_error

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.models.pi05 import Observation, Pi05, Pi05Config
from quantvla_fx.models.pi05.initialization import init_weights
from quantvla_fx.models.pi05.observation import jittered, random_observation
from quantvla_fx.quant.activations import dequantize_per_token, quantize_per_token
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from w4a16_accuracy_cpu import mlp_inputs  # noqa: E402  (each linear's inputs over the float run)

ROOT = Path(__file__).resolve().parents[1]
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def act_int8(x):
    return dequantize_per_token(*quantize_per_token(x))


def act_fp8(x):
    xf = x.float()
    scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX, min=1e-10)
    return (xf / scale).to(torch.float8_e4m3fn).float() * scale


ACTS = {"int8": act_int8, "fp8": act_fp8, "none": lambda x: x.float()}


def linears(policy, cfg: QuantVLAConfig) -> list[str]:
    return [n for n, m in policy.named_modules() if isinstance(m, torch.nn.Linear) and cfg.match(n)[0]]


def fake_quantized(policy, fqns, act, packs):
    """Forward hooks: each linear of ``fqns`` returns its fake-quantized output (removed by the caller)."""
    mods = dict(policy.named_modules())
    hooks = []
    for f in fqns:
        m = mods[f]
        t = packs[f].transform if packs is not None and f in packs else None
        w = m.weight.detach().float()
        wq = dequantize_weight(*quantize_weight_int4(t.transform_weight(w).float() if t is not None else w))

        def hook(mod, args, out, t=t, wq=wq):
            x = args[0]
            xt = t.transform_activation(x.float()) if t is not None else x.float()
            b = None if mod.bias is None else mod.bias.float()
            return F.linear(ACTS[act](xt), wq, b).to(out.dtype)

        hooks.append(m.register_forward_hook(hook))
    return hooks


def actions(policy, obs, noise, fqns=(), act=None, packs=None):
    hooks = fake_quantized(policy, fqns, act, packs) if act else []
    try:
        with torch.no_grad():
            return policy.sample_actions(obs, noise=noise)
    finally:
        for h in hooks:
            h.remove()


def load(fullsize: bool):
    if not fullsize:
        golden = ROOT / "tests" / "data" / "pi05_tiny"
        policy = Pi05.from_pretrained(golden).eval()
        obs = Observation.from_safetensors(golden / "inputs.safetensors")
        noise = load_file(str(golden / "inputs.safetensors"))["noise"]
        return "golden tiny Pi0.5 (openpi's weights, fp32)", policy, obs, noise, 32
    torch.manual_seed(0)
    cfg = Pi05Config.pi05_libero().with_overrides(vision_layers=1, llm_depth=2, expert_depth=2, vocab_size=1024)
    policy = Pi05(cfg)
    init_weights(policy)
    obs = random_observation(cfg, 1, "cpu")
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    return "pi05_libero widths, LM/expert depth 2, 1 vision layer, openpi random init, fp32", policy.eval(), obs, noise, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fullsize", action="store_true")
    ap.add_argument("--duquant", action="store_true", help="also with one-recipe DuQuant transforms")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, policy, obs, noise, block = load(args.fullsize)
    ref = actions(policy, obs, noise)
    mlp, every = QuantVLAConfig.pi05_mlp(), QuantVLAConfig.all_linears()
    sel = {"mlp": linears(policy, mlp), "all": linears(policy, every)}
    packs = {"rtn": None}
    if args.duquant:
        run = lambda m, b: m.sample_actions(*b, noise=noise)  # noqa: E731
        batches = [(jittered(obs, s),) for s in range(4)]
        packs["duquant"] = calibrate(policy, batches, mlp, run=run, block_size=block, search=False, progress=False)
    result = {"model": model, "torch": torch.__version__, "action_sqnr_db": {}, "per_linear_output_sqnr_db": []}
    for pname, p in packs.items():
        for sname, fqns in sel.items():
            if pname != "rtn" and sname != "mlp":
                continue  # the packs cover the MLP selection they were calibrated for
            for act in ACTS:
                db = round(float(compute_error(ref, actions(policy, obs, noise, fqns, act, p))), 2)
                result["action_sqnr_db"][f"{sname}_{pname}_{act}"] = db
                print(f"{sname:3} {pname:7} {act:4}: actions {db:6.2f} dB", flush=True)
    mods = dict(policy.named_modules())
    for f, x in mlp_inputs(policy, obs, noise, sel["mlp"]).items():
        x = x.float()
        w = mods[f].weight.detach().float()
        y = x @ w.t()
        wq = dequantize_weight(*quantize_weight_int4(w))
        row = {"linear": f, "NxK": f"{w.shape[0]}x{w.shape[1]}", "rows": x.shape[0]}
        row.update({act: round(float(compute_error(y, ACTS[act](x) @ wq.t())), 2) for act in ACTS})
        row.update({f"a_only_{act}": round(float(compute_error(y, ACTS[act](x) @ w.t())), 2) for act in ("int8", "fp8")})
        result["per_linear_output_sqnr_db"].append(row)
        print(row, flush=True)
    out = args.out or str(ROOT / "benchmarks" / "results" / "cpu" /
                          f"act_dtype_accuracy{'_fullsize' if args.fullsize else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
