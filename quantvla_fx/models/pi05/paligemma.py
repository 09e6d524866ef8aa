"""Containers that reproduce openpi's module tree:

``paligemma_with_expert.paligemma.model.{vision_tower, multi_modal_projector, language_model}``,
``paligemma_with_expert.paligemma.lm_head`` (tied to ``language_model.embed_tokens``) and
``paligemma_with_expert.gemma_expert.{model, lm_head}``.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import Pi05Config, VisionConfig
from .gemma import GemmaForCausalLM, GemmaModel
from .siglip import SiglipVisionModel

# The tied pair; openpi/safetensors files keep only one of the two names.
EMBED_KEY = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "paligemma_with_expert.paligemma.lm_head.weight"


class PaliGemmaMultiModalProjector(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemmaModel(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.vision_tower = SiglipVisionModel(cfg.vision)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(cfg.vision)
        self.language_model = GemmaModel(cfg.llm, cfg.rms_norm_eps, cfg.rope_theta, cfg.vocab_size, cond_dim=None)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # openpi's patch removes HF's division by sqrt(text hidden size) here.
        return self.multi_modal_projector(self.vision_tower(pixel_values))


class PaliGemmaForConditionalGeneration(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.model = PaliGemmaModel(cfg)
        self.lm_head = nn.Linear(cfg.llm.width, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.language_model.embed_tokens.weight


class PaliGemmaWithExpertModel(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(cfg)
        self.gemma_expert = GemmaForCausalLM(cfg.expert, cfg.rms_norm_eps, cfg.rope_theta, cfg.vocab_size,
                                             cond_dim=cfg.expert.width)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.paligemma.model.get_image_features(image)

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.paligemma.model.language_model.embed_tokens(tokens)
