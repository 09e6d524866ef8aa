"""The rewrite report: one record per linear the backend saw, and why it was or wasn't quantized.

Written as report.json (machine-readable) and report.md (for a person) into ``dump_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

log = logging.getLogger("quantvla_fx")


class QuantVLAWarning(UserWarning):
    """A condition of a compile the user must see (e.g. nothing was quantized); shown by default."""


@dataclass
class LinearRecord:
    graph: int
    node: str
    fqn: str  # the calling module: what include/exclude rules see
    param_fqn: Optional[str]  # the weight's own path (differs for tied weights)
    out_features: int
    in_features: int
    dtype: str
    device: str
    quantized: bool = False
    reason: str = ""  # rule that selected it, or why it was skipped
    group: Optional[str] = None
    op: Optional[str] = None
    kernel: Optional[str] = None
    duquant: list[str] = field(default_factory=list)  # what was folded into what / runs online
    sqnr_db: Optional[float] = None  # weight round-trip SQNR of the packed int4 weight
    scheme: Optional[str] = None  # w4a8 / w4a16 (quantized), float (kept by a layer_schemes rule)
    group_size: Optional[int] = None  # the weight group used (-1: one scale per output channel)


@dataclass
class AttentionRecord:
    """One scaled_dot_product_attention call: rewritten into quantvla::attention, or why not."""

    graph: int
    node: str
    fqn: Optional[str]  # the calling module
    layout: str = ""  # mha / enable_gqa / expanded / folded (see passes/attention_layout.py)
    shape: str = ""  # B, Hq/Hkv, Lq x Lk, D
    mask: str = ""  # none / key padding / key + query padding
    rewritten: bool = False
    reason: str = ""
    kernel: Optional[str] = None


@dataclass
class GraphReport:
    graph: int
    linears: list[LinearRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    hoisted: list[dict] = field(default_factory=list)  # passes/hoist_weight_only.py: what it computes once
    attention: list[AttentionRecord] = field(default_factory=list)  # passes/substitute_attention.py
    timings_s: dict[str, float] = field(default_factory=dict)  # wall time per rewrite stage (backend.rewrite)

    @property
    def quantized(self) -> list[LinearRecord]:
        return [r for r in self.linears if r.quantized]

    def warn(self, message: str) -> None:
        """Something the user must see: a Python warning, a log line and a note in the report."""
        log.warning("quantvla: %s", message)
        self.notes.append(message)
        warnings.warn(f"quantvla: {message}", QuantVLAWarning, stacklevel=2)

    def summary(self) -> str:
        return f"graph {self.graph}: {len(self.quantized)} of {len(self.linears)} linears quantized"

    def analysis_table(self, analysis: str) -> str:
        """Markdown of what an analysis recorded: the selection (match_linears) or the groups (group_inputs)."""
        if analysis == "group_inputs":
            groups: dict[str, list[str]] = {}
            for r in self.quantized:
                groups.setdefault(r.group or r.fqn, []).append(r.fqn)
            rows = ["| input group (one activation quantization) | linears |", "|---|---|"]
            rows += [f"| `{g}` | {', '.join(f'`{m}`' for m in ms)} |" for g, ms in groups.items()]
        else:
            rows = ["| linear (calling module) | N×K | dtype | device | selected | reason |", "|---|---|---|---|---|---|"]
            rows += [f"| `{r.fqn}` | {r.out_features}×{r.in_features} | {r.dtype} | {r.device} | "
                     f"{'yes' if r.quantized else 'no'} | {r.reason} |" for r in self.linears]
        return "\n".join(rows) + "\n"

    def to_dict(self) -> dict:
        return {"graph": self.graph, "summary": self.summary(), "passes": self.passes,
                "notes": self.notes, "hoisted": self.hoisted, "linears": [asdict(r) for r in self.linears],
                "attention": [asdict(r) for r in self.attention], "timings_s": self.timings_s}

    def to_markdown(self) -> str:
        lines = [f"## Graph {self.graph}", "", self.summary() + ".", ""]
        if self.passes:
            lines += ["Passes: " + " → ".join(self.passes), ""]
        if self.timings_s:
            lines += ["Rewrite time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings_s.items()), ""]
        for note in self.notes:
            lines.append(f"- {note}")
        if self.notes:
            lines.append("")
        for h in self.hoisted:
            lines += [f"Hoisted (weights and constants only, computed once per weight change): {h['nodes']} nodes, "
                      f"{h['compute_ops']} of them compute ({h['linears']} linears), from {h['weights']} weights, into "
                      f"{h['outputs']} values in {h['bytes']} bytes ({', '.join(h['buffers'])}).", ""]
        lines += ["| linear (calling module) | N×K | dtype | quantized | scheme (weight group) | reason | group | op / kernel | "
                  "weight SQNR dB | DuQuant |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.linears:
            alias = f" (weight `{r.param_fqn}`)" if r.param_fqn and not r.param_fqn.startswith(r.fqn + ".") else ""
            opk = f"{r.op} / {r.kernel}" if r.op else ""
            lines.append(
                f"| `{r.fqn}`{alias} | {r.out_features}×{r.in_features} | {r.dtype} | "
                f"{'yes' if r.quantized else 'no'} | {_scheme_cell(r)} | {r.reason} | {r.group or ''} | {opk} | "
                f"{'' if r.sqnr_db is None else r.sqnr_db} | {'; '.join(r.duquant)} |"
            )
        if self.attention:
            lines += ["", "| attention (calling module) | layout | B, Hq/Hkv, Lq×Lk, D | mask | rewritten | kernel / reason |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| `{a.fqn}` ({a.node}) | {a.layout} | {a.shape} | {a.mask} | {'yes' if a.rewritten else 'no'} | "
                      f"{a.kernel if a.rewritten else a.reason} |" for a in self.attention]
        return "\n".join(lines) + "\n"


def _scheme_cell(r: LinearRecord) -> str:
    if r.scheme is None or not r.quantized:
        return r.scheme or ""
    return f"{r.scheme} ({'per channel' if r.group_size in (None, -1) else f'g{r.group_size}'})"


class ReportBook:
    """All graphs compiled into one dump_dir in this process; rewritten after each graph."""

    def __init__(self, dump_dir: Optional[str]):
        self.dump_dir = dump_dir
        self.graphs: list[GraphReport] = []

    def add(self, report: GraphReport) -> None:
        self.graphs.append(report)
        if self.dump_dir:
            self.write()

    def write(self) -> None:
        os.makedirs(self.dump_dir, exist_ok=True)
        total = sum(len(g.linears) for g in self.graphs)
        quant = sum(len(g.quantized) for g in self.graphs)
        with open(os.path.join(self.dump_dir, "report.json"), "w") as f:
            json.dump({"quantized": quant, "linears": total, "graphs": [g.to_dict() for g in self.graphs]}, f, indent=1)
        md = ["# quantvla rewrite report", "",
              f"{quant} of {total} linears quantized across {len(self.graphs)} graph(s). "
              "Each graph's dumps are in `graph_NNN/` (one file per pass, before → after).", ""]
        md += [g.to_markdown() for g in self.graphs]
        with open(os.path.join(self.dump_dir, "report.md"), "w") as f:
            f.write("\n".join(md))
