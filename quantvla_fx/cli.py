"""``quantvla-fx`` (also ``python -m quantvla_fx``): look at a policy before compiling it.

    quantvla-fx inspect CHECKPOINT [--preset P] [--include RE]... [--exclude RE]... [--all-linears] [--json]
    quantvla-fx calibrate CHECKPOINT --out packs.safetensors [--data obs.safetensors]...

Bad input (a missing folder, an unreadable file, a bad regex) exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .commands.calibrate import add_calibrate
from .commands.common import UserError
from .commands.inspect import add_inspect


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="quantvla-fx", description="Inspect and calibrate W4A8 quantization of a Pi0.5 policy.",
        epilog="Selection follows QuantVLAConfig: OPENPI_BITBLAS_* variables first, then these flags.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_inspect(sub)
    add_calibrate(sub)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        return args.run(args)
    except UserError as e:
        print(f"quantvla-fx {args.command}: error: {e}", file=sys.stderr)
        return 2

