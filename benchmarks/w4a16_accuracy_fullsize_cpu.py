"""W4A16 vs W4A8 on full-width Pi0.5 with random weights, on the CPU (issue 16).

    python benchmarks/w4a16_accuracy_fullsize_cpu.py [--depth 2] [--out benchmarks/results/cpu/w4a16_accuracy_fullsize.json]

pi05_libero widths (LM 2048 / MLP 16384, expert 1024 / 4096, SigLIP 1152) with ``--depth`` layers
per stack (1 vision layer, vocab 1024: the embedding size does not matter here), openpi's weight
init (models/pi05/initialization.py), fp32, one random observation: the K of the real model
(2048 .. 16384), so the default W4A16 group (128) is a real group here, unlike the tiny model.
Action SQNR (torchao's compute_error, dB, vs float) for the seeds' MLP selection and every linear,
W4A8 vs W4A16 (per channel, group 128), round-to-nearest; per-linear output SQNR of the MLP
linears on their own inputs.  Not a trained checkpoint: random weights are near-Gaussian.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from w4a16_accuracy_cpu import actions_compiled, mlp_inputs  # noqa: E402

from quantvla_fx import QuantVLAConfig  # noqa: E402
from quantvla_fx.backend import report_book  # noqa: E402
from quantvla_fx.models.pi05 import Pi05, Pi05Config  # noqa: E402
from quantvla_fx.models.pi05.initialization import init_weights  # noqa: E402
from quantvla_fx.models.pi05.observation import random_observation  # noqa: E402
from quantvla_fx.quant.activations import dequantize_per_token, quantize_per_token  # noqa: E402
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4  # noqa: E402
from torchao.quantization.utils import compute_error  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cpu/w4a16_accuracy_fullsize.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = Pi05Config.pi05_libero().with_overrides(vision_layers=1, llm_depth=args.depth, expert_depth=args.depth,
                                                  vocab_size=1024)
    policy = Pi05(cfg)
    init_weights(policy)
    policy.eval()
    obs = random_observation(cfg, 1, "cpu")
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    print(f"float run {time.time() - t0:.1f} s", flush=True)
    actions = {}
    runs = [("mlp", QuantVLAConfig.pi05_mlp), ("all", QuantVLAConfig.all_linears)]
    for sel, make in runs:
        for name, over in (("w4a8", {}), ("w4a16_per_channel", {"scheme": "w4a16", "w4a16_group_size": -1}),
                           ("w4a16_g128", {"scheme": "w4a16"})):
            t0 = time.time()
            a = actions_compiled(policy, obs, noise, make(lowering="eager", **over))
            actions[f"{sel}_{name}"] = round(float(compute_error(ref, a)), 2)
            print(f"{sel} {name}: {actions[f'{sel}_{name}']} dB ({time.time() - t0:.0f} s)", flush=True)
            if sel == "mlp":
                fqns = list(dict.fromkeys(r.fqn for r in report_book(None).graphs[-1].quantized))
    mods = dict(policy.named_modules())
    table = []
    for f, x in mlp_inputs(policy, obs, noise, fqns).items():
        w = mods[f].weight.detach().float()
        ref_y = x @ w.t()
        q = lambda g: dequantize_weight(*quantize_weight_int4(w, g))  # noqa: E731
        table.append({"linear": f, "NxK": f"{w.shape[0]}x{w.shape[1]}", "rows": x.shape[0],
                      "w4a8": round(float(compute_error(ref_y, dequantize_per_token(*quantize_per_token(x)) @ q(-1).t())), 2),
                      "w4a16_per_channel": round(float(compute_error(ref_y, x @ q(-1).t())), 2),
                      "w4a16_g128": round(float(compute_error(ref_y, x @ q(128).t())), 2)})
    print(json.dumps(actions, indent=1))
    for r in table:
        print(r)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": f"pi05_libero widths, depth {args.depth}, random init, fp32, CPU", "torch": torch.__version__,
                   "action_sqnr_db": actions, "per_linear_output_sqnr_db": table}, f, indent=1)


if __name__ == "__main__":
    main()
