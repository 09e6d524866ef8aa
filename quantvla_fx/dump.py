"""Dumps a person can read: the graph after each pass, each analysis as a table, a node table with FQNs."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.fx as fx

from .graph_utils import call_site_fqn


class GraphDumper:
    def __init__(self, dump_dir: Optional[str], graph_id: int):
        self.dir = os.path.join(dump_dir, f"graph_{graph_id:03d}") if dump_dir else None
        self.step = 0
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)

    def dump(self, stage: str, gm: fx.GraphModule) -> None:
        if not self.dir:
            return
        code = gm.print_readable(print_output=False, include_stride=True, include_device=True)
        path = os.path.join(self.dir, f"{self.step:02d}_{stage}.py")
        with open(path, "w") as f:
            f.write(f"# quantvla graph dump: after stage '{stage}'\n{code}")
        self.step += 1

    def table(self, stage: str, markdown: str) -> None:
        """What an analysis found (it leaves the graph as it was, so a graph dump would repeat Dynamo's)."""
        if not self.dir:
            return
        with open(os.path.join(self.dir, f"{self.step:02d}_{stage}.md"), "w") as f:
            f.write(f"# quantvla analysis '{stage}' (the graph is unchanged)\n\n{markdown}")
        self.step += 1

    def write(self, name: str, markdown: str) -> None:
        """A named page of this graph's dumps (e.g. ``regions.md`` from the lowering)."""
        if self.dir:
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(markdown)

    def node_table(self, gm: fx.GraphModule) -> None:
        if not self.dir:
            return
        rows = ["| node | op | target | shape | dtype | calling module |", "|---|---|---|---|---|---|"]
        for n in gm.graph.nodes:
            v = n.meta.get("example_value")
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else ""
            dtype = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else ""
            target = getattr(n.target, "__name__", None) or str(n.target)
            rows.append(f"| {n.name} | {n.op} | `{target}` | {shape} | {dtype} | {call_site_fqn(n) or ''} |")
        with open(os.path.join(self.dir, "nodes.md"), "w") as f:
            f.write("\n".join(rows) + "\n")
