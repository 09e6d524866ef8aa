"""The main job on the CPU: tiny Pi0.5 (openpi's golden checkpoint) → DuQuant → W4A8 → actions.

    python examples/pi05_tiny.py [--golden tests/data/pi05_tiny] [--dump-dir dumps/pi05_tiny]

Loads the golden tiny checkpoint, calibrates on a few jittered observations (the sequential
per-group search over RTN / smoothing / rotations / DuQuant with GPTQ int4 rounding), compiles
``sample_actions`` with ``backend="quantvla"`` (the MLPs of the PaliGemma LM and the action
expert, int4 weights / int8 activations, reference kernels on the CPU), and prints the action
SQNR against the float model, how many linears were quantized, and where the dumps are.
"""
import argparse
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.backend import report_book
from quantvla_fx.models.pi05 import Observation, Pi05
from quantvla_fx.models.pi05.observation import jittered
# torchao after quantvla_fx: the package quiets torchao's import noise on CPU-only machines
from torchao.quantization.utils import compute_error

# openpi's real tiny Pi0.5 checkpoint, inputs and actions, shipped with the repository.
DEFAULT_GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "pi05_tiny"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--golden", default=os.environ.get("QUANTVLA_GOLDEN", str(DEFAULT_GOLDEN)))
    ap.add_argument("--dump-dir", default="dumps/pi05_tiny")
    ap.add_argument("--no-duquant", action="store_true", help="round-to-nearest instead of DuQuant")
    ap.add_argument("--rounding", choices=("gptq", "rtn"), default="gptq", help="int4 rounding the search uses")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    golden = Path(args.golden)
    if not (golden / "model.safetensors").exists():
        raise SystemExit(f"golden checkpoint not found at {golden} (set --golden or QUANTVLA_GOLDEN)")

    policy = Pi05.from_pretrained(golden).eval()
    obs = Observation.from_safetensors(golden / "inputs.safetensors")
    noise = load_file(str(golden / "inputs.safetensors"))["noise"]
    cfg = QuantVLAConfig.pi05_mlp(dump_dir=args.dump_dir)
    packs = None
    if not args.no_duquant:
        batches = [(jittered(obs, s),) for s in range(4)]
        # The tiny widths (32, 64, 128) take block 32 rotations too (full size: 64 and 128).
        packs = calibrate(policy, batches, cfg, run=lambda m, b: m.sample_actions(*b, noise=noise),
                          block_size=32, search=True, weight_rounding=args.rounding)
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
        compiled = torch.compile(policy.sample_actions, backend="quantvla", options=cfg.replace(packs=packs).to_options())
        actions = compiled(obs, noise=noise)
    quantized = sum(len(g.quantized) for g in report_book(args.dump_dir).graphs)
    print(f"actions {tuple(actions.shape)}: SQNR vs float {float(compute_error(ref, actions)):.1f} dB "
          f"({'searched' if packs is not None else 'RTN'} W4A8)")
    print(f"quantized linears: {quantized}   report: {args.dump_dir}/report.md   dumps: {args.dump_dir}/graph_*/")


if __name__ == "__main__":
    main()
