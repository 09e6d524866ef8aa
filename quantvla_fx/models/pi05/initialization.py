"""Random initialisation for a model built without a checkpoint (HF's scheme: N(0, 0.02)
linears/convs/embeddings with zero bias, LayerNorm 1/0, Gemma RMSNorm weight 0 => scale 1)."""
from __future__ import annotations

from torch import nn

from .gemma import GemmaRMSNorm

INIT_STD = 0.02


def init_module(module: nn.Module, std: float = INIT_STD) -> None:
    """Initialise ``module``'s own parameters (not its children's)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, GemmaRMSNorm) and module.dense is None:
        nn.init.zeros_(module.weight)


def init_weights(model: nn.Module, std: float = INIT_STD) -> None:
    for module in model.modules():
        init_module(module, std)
