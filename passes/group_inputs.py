"""Analysis 2: linears that read the same activation node (q/k/v, gate/up) with one scheme form a group.

A group gets one input transform and one activation quantization, shared by its GEMMs (linears of
one input under different schemes, e.g. a W4A16 q_proj next to a W4A8 k_proj, are separate groups).
"""
from __future__ import annotations

import torch.fx as fx

from quantvla_fx.naming import group_name
from quantvla_fx.rewrite_context import GroupSite, RewriteContext


def group_inputs(gm: fx.GraphModule, ctx: RewriteContext) -> None:
    by_input: dict[tuple, GroupSite] = {}
    for site in ctx.kept:
        key = (site.input_node, site.record.scheme)
        group = by_input.get(key)
        if group is None:
            group = by_input[key] = GroupSite(name="", input_node=site.input_node)
            ctx.groups.append(group)
        group.members.append(site)
        site.group = group
    for group in ctx.groups:
        group.name = group_name([s.record.fqn for s in group.members])
        for s in group.members:
            s.record.group = group.name
