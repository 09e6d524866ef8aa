"""Pass 3: DuQuant transforms (placeholder until the DuQuant pass lands; RTN needs nothing here)."""
from __future__ import annotations

import torch.fx as fx

from quantvla_fx.rewrite_context import RewriteContext


def fold_duquant(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    if ctx.packs is not None:
        raise NotImplementedError("quantvla: DuQuant packs are not supported yet")
    return gm
