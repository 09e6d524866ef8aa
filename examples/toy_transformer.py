"""Compile torchao's toy TransformerBlock with the quantvla backend on the CPU.

    python examples/toy_transformer.py [--dump-dir dumps/toy]

Prints the output SQNR against the float model and where the rewrite report and graph dumps are.
"""
import argparse
import logging

import torch

from quantvla_fx import QuantVLAConfig
# torchao after quantvla_fx: the package quiets torchao's import noise on CPU-only machines
from torchao.quantization.utils import compute_error
from torchao.testing.model_architectures import TransformerBlock


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump-dir", default="dumps/toy_transformer")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")

    torch.manual_seed(0)
    model = TransformerBlock(args.hidden, num_heads=8, dtype=torch.float32).eval()
    x = torch.randn(2, args.tokens, args.hidden)
    # Every linear of the block (its norms are not linears); int4 weights, int8 activations.
    cfg = QuantVLAConfig.all_linears(dump_dir=args.dump_dir)
    compiled = torch.compile(model, backend="quantvla", options=cfg.to_options())
    with torch.no_grad():
        ref = model(x)
        out = compiled(x)
    print(f"output SQNR vs float: {float(compute_error(ref, out)):.1f} dB")
    print(f"rewrite report: {args.dump_dir}/report.md   graph dumps: {args.dump_dir}/graph_000/")


if __name__ == "__main__":
    main()
