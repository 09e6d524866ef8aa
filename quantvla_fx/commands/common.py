"""What the subcommands share: selection flags, the config they give, and user errors."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from ..config import ConfigError, QuantVLAConfig


class UserError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def add_selection_flags(p) -> None:
    p.add_argument("checkpoint", help="openpi-converted or lerobot Pi0.5 checkpoint: a folder or a .safetensors file")
    p.add_argument("--preset", help="Pi05Config preset (pi05_libero, pi05_droid, pi05_base, tiny) or a config.json, "
                                    "when the checkpoint carries no config")
    p.add_argument("--include", action="append", metavar="RE",
                   help="regex searched in each linear's calling-module FQN (repeatable; default: the LM and "
                        "expert MLPs, or OPENPI_BITBLAS_INCLUDE)")
    p.add_argument("--exclude", action="append", metavar="RE", help="regex that vetoes a match (repeatable)")
    p.add_argument("--all-linears", action="store_true", help="select every linear (QuantVLAConfig.all_linears)")
    p.add_argument("--group-size", type=int, help="int4 weight group size (-1: one scale per output channel)")
    p.add_argument("--scheme", choices=("w4a8", "w4a16"),
                   help="w4a8 (int4 weights x int8 activations, the default) or w4a16 (weight-only int4; "
                        "OPENPI_BITBLAS_ENABLE=1); --group-size then sets that scheme's group")


def config_from(args) -> QuantVLAConfig:
    """OPENPI_BITBLAS_* variables first (the seeds' scripts), then the flags."""
    over = {}
    if args.all_linears:
        over["include"] = (r".*",)
    if args.include:
        over["include"] = tuple(args.include)
    if args.exclude:
        over["exclude"] = tuple(args.exclude)
    with user_errors():
        base = QuantVLAConfig.from_env()
        scheme = getattr(args, "scheme", None) or base.scheme
        over["scheme"] = scheme
        if args.group_size is not None:
            over["w4a16_group_size" if scheme == "w4a16" else "group_size"] = args.group_size
        return base.replace(**over)


@contextmanager
def user_errors():
    """Errors that name a bad file, field or value become one-line UserErrors."""
    from ..duquant.errors import PackError
    from ..models.pi05 import CheckpointError, Pi05ConfigError

    try:
        yield
    except (ConfigError, CheckpointError, Pi05ConfigError, PackError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from e


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")
