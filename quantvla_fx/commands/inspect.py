"""``quantvla-fx inspect``: which linears the backend would quantize, without compiling or reading weights."""
from __future__ import annotations

import torch

from ..selection import packed_bytes, weight_rule_violation
from .common import add_selection_flags, config_from, print_json, user_errors

_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list every linear with its quantization decision",
                       description="Print, per linear of the policy, its calling-module FQN, N×K, whether the "
                                   "backend would quantize it and why, and its weight bytes before and after.")
    add_selection_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON (one object per linear) instead of a table")
    p.set_defaults(run=run)


def rows(checkpoint, preset, config) -> list[dict]:
    """One dict per nn.Linear of the model the checkpoint describes, in module order."""
    from ..models.pi05 import Pi05
    from ..models.pi05.checkpoint import describe_checkpoint

    with user_errors():
        cfg, stored = describe_checkpoint(checkpoint, preset)
    with torch.device("meta"):
        model = Pi05(cfg)
    out = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        dtype_name, shape = stored.get(fqn + ".weight", ("F32", tuple(mod.weight.shape)))
        n, k = shape
        selected, reason = config.match(fqn)
        scheme, group = None, None
        if selected:  # the same rules as the backend's match_linears
            scheme, by = config.scheme_for(fqn)
            if by != "scheme":
                reason += f"; {scheme} by {by}"
            selected = scheme != "float"
        if selected:
            group = config.group_size_for(scheme, k)
            why = weight_rule_violation(shape, _DTYPES.get(dtype_name, torch.float32), group)
            if why:
                selected, reason = False, f"skipped: {why}"
        before = n * k * _BYTES.get(dtype_name, 4)
        out.append({"fqn": fqn, "out_features": n, "in_features": k, "dtype": dtype_name, "quantized": selected,
                    "scheme": scheme, "group_size": group if selected else None, "reason": reason,
                    "bytes_before": before, "bytes_after": packed_bytes(n, k, group) if selected else before})
    return out


def run(args) -> int:
    config = config_from(args)
    table = rows(args.checkpoint, args.preset, config)
    if args.json:
        print_json(table)
        return 0
    width = max(len(r["fqn"]) for r in table)
    for r in table:
        mark = r["scheme"].upper() if r["quantized"] else "keep"
        print(f"{r['fqn']:<{width}}  {r['out_features']:>6}x{r['in_features']:<6} {r['dtype']:<4} {mark:<5}  {r['reason']}")
    chosen = [r for r in table if r["quantized"]]
    before, after = sum(r["bytes_before"] for r in table), sum(r["bytes_after"] for r in table)
    print(f"\n{len(chosen)} of {len(table)} linears would be quantized; linear weights {before / 2**20:.2f} MiB "
          f"-> {after / 2**20:.2f} MiB")
    return 0
