"""Names shared by the compiler and calibration: if they drifted apart, packs would stop matching."""
from __future__ import annotations

import os


def group_name(fqns: list[str]) -> str:
    """``a.b.{gate_proj,up_proj}`` for linears that read one activation; the FQN itself for one."""
    if len(fqns) == 1:
        return fqns[0]
    parts = [f.split(".") for f in fqns]
    prefix = os.path.commonprefix(parts)
    tails = [".".join(p[len(prefix):]) for p in parts]
    return ".".join(prefix + ["{" + ",".join(tails) + "}"])
