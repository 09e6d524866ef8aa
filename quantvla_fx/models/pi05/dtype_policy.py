"""Parameter dtypes: all-fp32, or openpi's mixed bf16 policy
(``gemma_pytorch.py::to_bfloat16_for_selected_params``)."""
from __future__ import annotations

import torch
from torch import nn

DTYPE_POLICIES = ("float32", "openpi_bf16")
_ALIASES = {"fp32": "float32", "float32": "float32", "openpi_bf16": "openpi_bf16", "bfloat16": "openpi_bf16"}

# openpi casts all of paligemma_with_expert to bf16, then back to fp32 every parameter whose
# name contains one of these (substring test, as openpi does: "model.norm" also matches
# "language_model.norm"). Modules outside paligemma_with_expert (time MLP, action projections)
# keep fp32.
_OPENPI_FP32_NAME_PARTS = (
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.bias",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
)


def canonical_policy(policy: str) -> str:
    if policy not in _ALIASES:
        raise ValueError(f"unknown dtype_policy {policy!r}; expected one of {list(DTYPE_POLICIES)}")
    return _ALIASES[policy]


def param_dtype(name: str, policy: str) -> torch.dtype:
    """The dtype parameter ``name`` (a state-dict key) has under ``policy``."""
    if canonical_policy(policy) == "float32":
        return torch.float32
    if name.startswith("paligemma_with_expert.") and not any(p in name for p in _OPENPI_FP32_NAME_PARTS):
        return torch.bfloat16
    return torch.float32


def cast_for_policy(name: str, tensor: torch.Tensor, policy: str) -> torch.Tensor:
    """``tensor`` as parameter ``name`` holds it under ``policy``. Like openpi (bf16 first, then
    selected parameters back to fp32), the fp32 parameters inside paligemma_with_expert hold
    bf16-representable values under openpi_bf16."""
    dtype = param_dtype(name, policy)
    if canonical_policy(policy) == "openpi_bf16" and name.startswith("paligemma_with_expert."):
        tensor = tensor.to(torch.bfloat16)
    return tensor.to(dtype)


def apply_dtype_policy(model: nn.Module, policy: str) -> nn.Module:
    """Cast parameters in place (``.data``), so tied parameters stay one object."""
    for name, p in model.named_parameters():
        cast = cast_for_policy(name, p.data, policy)
        if cast.dtype != p.dtype or cast.data_ptr() != p.data_ptr():
            p.data = cast
    return model
