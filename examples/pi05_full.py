"""Full-size Pi0.5 on a GPU: W4A8 (DuQuant optional) through backend="quantvla".

    python examples/pi05_full.py [--checkpoint DIR] [--preset pi05_libero] [--packs FILE]
                                 [--kernel auto] [--dump-dir dumps/pi05_full]

Builds the preset with random weights (or loads an openpi/lerobot checkpoint), applies openpi's
bf16 dtype policy, compiles ``sample_actions`` with the seeds' layer selection (LM + expert MLPs),
runs one random observation and prints the action SQNR against the bf16 model, the number of
quantized linears and the time per call.  ``--vision-layers/--llm-depth/--expert-depth`` shrink
the stacks for a quick check (also on the CPU with ``--device cpu``).
"""
import argparse
import logging
import time

import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.models.pi05 import Pi05, Pi05Config, apply_dtype_policy
from quantvla_fx.models.pi05.initialization import init_weights
from quantvla_fx.models.pi05.observation import random_observation
# torchao after quantvla_fx: the package quiets torchao's import noise on CPU-only machines
from torchao.quantization.utils import compute_error


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="CPU check: --device cpu --vision-layers 1 --llm-depth 1 --expert-depth 1")
    ap.add_argument("--checkpoint", help="openpi-converted or lerobot model directory / .safetensors")
    ap.add_argument("--preset", default="pi05_libero", choices=["pi05_libero", "pi05_droid", "pi05_base"])
    ap.add_argument("--packs", help="DuQuant packs (our .safetensors or a QuantVLA .npz folder)")
    ap.add_argument("--kernel", default="auto", choices=["auto", "triton", "bitblas", "reference"])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (then shrink the stacks, see below)")
    ap.add_argument("--dump-dir", default="dumps/pi05_full", help="graph dumps and the rewrite report")
    ap.add_argument("--vision-layers", type=int, help="keep only this many SigLIP layers (quick checks)")
    ap.add_argument("--llm-depth", type=int, help="keep only this many PaliGemma LM layers (quick checks)")
    ap.add_argument("--expert-depth", type=int, help="keep only this many action-expert layers (quick checks)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with small --*-depth values) for a CPU check")

    cfg = Pi05Config.preset(args.preset).with_overrides(
        vision_layers=args.vision_layers, llm_depth=args.llm_depth, expert_depth=args.expert_depth)
    if args.checkpoint:
        policy = Pi05.from_pretrained(args.checkpoint, config=cfg)
    else:
        policy = Pi05(cfg)
        init_weights(policy)
    policy = apply_dtype_policy(policy.to(args.device), "openpi_bf16").eval()
    obs = random_observation(cfg, 1, args.device)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, device=args.device)

    qcfg = QuantVLAConfig.pi05_mlp(kernel=args.kernel, packs=args.packs, dump_dir=args.dump_dir)
    compiled = torch.compile(policy.sample_actions, backend="quantvla", options=qcfg.to_options())
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
        t0 = time.perf_counter()
        actions = compiled(obs, noise=noise)
        compile_s = time.perf_counter() - t0
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            compiled(obs, noise=noise)
        sync()
        per_call_ms = (time.perf_counter() - t0) / 5 * 1e3
    quantized = sum(len(g.quantized) for g in report_book(args.dump_dir).graphs)
    print(f"actions {tuple(actions.shape)}: SQNR vs bf16 {float(compute_error(ref.float(), actions.float())):.1f} dB")
    print(f"quantized linears: {quantized}; first call (compile) {compile_s:.0f} s; {per_call_ms:.1f} ms per call")
    print(f"report: {args.dump_dir}/report.md")


if __name__ == "__main__":
    main()
