"""Analysis 2: linears that read the same activation node (q/k/v, gate/up) form one group.

A group gets one input transform and one activation quantization, shared by its GEMMs.
"""
from __future__ import annotations

import torch.fx as fx

from quantvla_fx.naming import group_name
from quantvla_fx.rewrite_context import GroupSite, RewriteContext


def group_inputs(gm: fx.GraphModule, ctx: RewriteContext) -> None:
    by_input: dict[fx.Node, GroupSite] = {}
    for site in ctx.kept:
        group = by_input.get(site.input_node)
        if group is None:
            group = by_input[site.input_node] = GroupSite(name="", input_node=site.input_node)
            ctx.groups.append(group)
        group.members.append(site)
        site.group = group
    for group in ctx.groups:
        group.name = group_name([s.record.fqn for s in group.members])
        for s in group.members:
            s.record.group = group.name
