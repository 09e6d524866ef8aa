"""Pi05: openpi's ``PI0Pytorch`` (pi05=True) inference path in plain PyTorch.

sample_actions = preprocess -> embed_prefix (SigLIP + projector for each camera, scaled token
embeddings) -> one LM pass over the prefix that keeps each layer's post-RoPE K/V ->
``num_steps`` Euler steps, each one velocity evaluation of the action expert over [cached
prefix K/V, own K/V] (the cache is read, never written). ``denoise_step`` is that evaluation
with openpi's signature; sample_actions builds the step-independent parts (suffix mask and
positions, the time conditioning of every step) once, before the loop. The loop is a Python
``for`` over the float32-accumulated times, so ``torch.compile(model.sample_actions,
fullgraph=True)`` traces one graph and the times equal openpi's tensor ``while`` loop bit for bit.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, save_pi05
from .config import Pi05Config
from .gemma import KVPair
from .initialization import init_weights
from .masks import additive_mask_4d, make_att_2d_masks
from .observation import Observation, preprocess_observation
from .paligemma import PaliGemmaWithExpertModel
from .schedule import float32_euler_schedule


def sinusoidal_time_embedding(time: torch.Tensor, dimension: int, min_period: float, max_period: float) -> torch.Tensor:
    """openpi's ``create_sinusoidal_pos_embedding``: [sin, cos], computed in float64."""
    if time.ndim != 1:
        raise ValueError(f"time must be (B,), got shape {tuple(time.shape)}")
    fraction = torch.linspace(0.0, 1.0, dimension // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling_factor = 1.0 / period * 2 * math.pi
    sin_input = scaling_factor[None, :] * time[:, None]
    return torch.cat([torch.sin(sin_input), torch.cos(sin_input)], dim=1)


class Pi05(nn.Module):
    def __init__(self, config: Pi05Config):
        super().__init__()
        self.config = config
        self.paligemma_with_expert = PaliGemmaWithExpertModel(config)
        width = config.expert.width
        self.action_in_proj = nn.Linear(config.action_dim, width)
        self.action_out_proj = nn.Linear(width, config.action_dim)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        init_weights(self)

    def tie_weights(self) -> None:
        self.paligemma_with_expert.paligemma.tie_weights()

    # ------------------------------------------------------------------ prefix
    def embed_prefix(self, images: Sequence[torch.Tensor], img_masks: Sequence[torch.Tensor],
                     lang_tokens: torch.Tensor, lang_masks: torch.Tensor):
        """-> (embs (B, P, W_lm), pad_masks (B, P) bool, att_masks (B, P) bool all False)."""
        pwe = self.paligemma_with_expert
        batch = lang_tokens.shape[0]
        # All cameras in one SigLIP pass (same math per image as openpi's per-camera loop).
        pixel_dtype = pwe.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        pixels = torch.cat([img.to(pixel_dtype) for img in images], dim=0)
        img_embs = pwe.embed_image(pixels)
        tokens_per_image = img_embs.shape[1]
        embs = list(img_embs.split(batch, dim=0))
        pad_masks = [m[:, None].expand(batch, tokens_per_image) for m in img_masks]

        lang_emb = pwe.embed_language_tokens(lang_tokens)
        lang_emb = lang_emb * math.sqrt(lang_emb.shape[-1])  # Gemma's embedding normaliser, applied here
        embs.append(lang_emb.to(img_embs.dtype))
        pad_masks.append(lang_masks)

        embs = torch.cat(embs, dim=1)
        pad_masks = torch.cat(pad_masks, dim=1)
        att_masks = torch.zeros_like(pad_masks)  # one bidirectional block
        return embs, pad_masks, att_masks

    def forward_prefix(self, prefix_embs: torch.Tensor, prefix_pad_masks: torch.Tensor,
                       prefix_att_masks: torch.Tensor) -> list[KVPair]:
        """LM pass over the prefix; returns the per-layer post-RoPE (K, V), each (B, Hkv, P, D)."""
        att_2d = make_att_2d_masks(prefix_pad_masks, prefix_att_masks)
        position_ids = torch.cumsum(prefix_pad_masks, dim=1) - 1
        lm = self.paligemma_with_expert.paligemma.model.language_model
        _, past_key_values = lm(prefix_embs, position_ids, additive_mask_4d(att_2d))
        return past_key_values

    # ------------------------------------------------------------------ suffix
    def embed_suffix(self, state: Optional[torch.Tensor], noisy_actions: torch.Tensor, timestep: torch.Tensor):
        """-> (action tokens (B, H, W_ex), pad_masks, att_masks, adarms_cond (B, W_ex)).
        Pi0.5 has no state token; ``state`` is accepted for openpi's signature."""
        action_emb, adarms_cond = self._embed_actions_and_time(noisy_actions, timestep)
        pad_masks, att_masks = _suffix_masks(action_emb.shape[0], action_emb.shape[1], action_emb.device)
        return action_emb, pad_masks, att_masks, adarms_cond

    def _embed_actions_and_time(self, noisy_actions: torch.Tensor, timestep: torch.Tensor):
        action_emb = self.action_in_proj(noisy_actions.to(self.action_in_proj.weight.dtype))
        return action_emb, self.time_conditioning(timestep)

    def time_conditioning(self, timestep: torch.Tensor) -> torch.Tensor:
        """(N,) times -> adarms_cond (N, W_ex): sin/cos embedding (float64) -> time MLP -> silu."""
        cfg = self.config
        time_emb = sinusoidal_time_embedding(timestep, cfg.expert.width, cfg.time_min_period, cfg.time_max_period)
        time_emb = time_emb.to(timestep.dtype)
        cond = F.silu(self.time_mlp_in(time_emb.to(self.time_mlp_in.weight.dtype)))
        return F.silu(self.time_mlp_out(cond))

    def suffix_attention_inputs(self, prefix_pad_masks: torch.Tensor):
        """Additive mask (B, 1, H, P+H) and position ids (B, H) of the action tokens. They do not
        depend on x_t or t, so sample_actions builds them once for all steps."""
        batch, prefix_len = prefix_pad_masks.shape
        horizon = self.config.action_horizon
        suffix_pad, suffix_att = _suffix_masks(batch, horizon, prefix_pad_masks.device)
        prefix_2d = prefix_pad_masks[:, None, :].expand(batch, horizon, prefix_len)
        suffix_2d = make_att_2d_masks(suffix_pad, suffix_att)
        mask = additive_mask_4d(torch.cat([prefix_2d, suffix_2d], dim=2))
        position_ids = torch.sum(prefix_pad_masks, dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        return mask, position_ids

    def denoise_step(self, state: Optional[torch.Tensor], prefix_pad_masks: torch.Tensor,
                     past_key_values: Sequence[KVPair], x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """One velocity evaluation v_t = f(x_t, t) (B, H, action_dim), fp32 (openpi's signature).
        Reads the KV cache, never writes it."""
        mask, position_ids = self.suffix_attention_inputs(prefix_pad_masks)
        return self._velocity(past_key_values, mask, position_ids, x_t, self.time_conditioning(timestep))

    def _velocity(self, past_key_values, mask, position_ids, x_t, adarms_cond) -> torch.Tensor:
        suffix_embs = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        expert = self.paligemma_with_expert.gemma_expert.model
        out, _ = expert(suffix_embs, position_ids, mask, past_key_values, adarms_cond)
        out = out[:, -self.config.action_horizon:]
        return self.action_out_proj(out.to(self.action_out_proj.weight.dtype))

    # ---------------------------------------------------------------- sampling
    def sample_noise(self, shape, device) -> torch.Tensor:
        return torch.normal(mean=0.0, std=1.0, size=shape, dtype=torch.float32, device=device)

    @torch.no_grad()
    def sample_actions(self, *args: Any, noise: Optional[torch.Tensor] = None,
                       num_steps: Optional[int] = None) -> torch.Tensor:
        """``sample_actions(observation, noise=None, num_steps=None)`` -> actions (B, H, action_dim).

        openpi's call form ``sample_actions(device, observation, noise=..., num_steps=...)`` is
        accepted too (the device is ignored: inputs and weights decide where it runs).
        ``num_steps`` defaults to ``config.num_steps`` (10)."""
        observation, noise, num_steps = _split_sample_args(args, noise, num_steps)
        if num_steps is None:
            num_steps = self.config.num_steps
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        cfg = self.config
        images, img_masks, lang_tokens, lang_masks, state = preprocess_observation(
            observation, cfg.vision.image_size, cfg.vision.num_channels)
        batch = lang_tokens.shape[0]
        device = lang_tokens.device
        shape = (batch, cfg.action_horizon, cfg.action_dim)
        if noise is None:
            noise = self.sample_noise(shape, device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (B, action_horizon, action_dim), got {tuple(noise.shape)}")

        prefix_embs, prefix_pad_masks, prefix_att_masks = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
        past_key_values = self.forward_prefix(prefix_embs, prefix_pad_masks, prefix_att_masks)

        # Euler from t=1 to t=0 with openpi's float32-accumulated times (see schedule.py); the
        # Python loop unrolls under torch.compile, so the whole sampler is one graph.
        dt, times = float32_euler_schedule(num_steps)
        mask, position_ids = self.suffix_attention_inputs(prefix_pad_masks)
        # The time conditioning does not depend on x_t: one time-MLP pass for all steps (the same
        # rows openpi computes step by step; under Inductor it also avoids one kernel per t).
        timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        conds = self.time_conditioning(timesteps.repeat_interleave(batch)).view(len(times), batch, -1)
        x_t = noise.to(torch.float32)
        for step in range(len(times)):
            v_t = self._velocity(past_key_values, mask, position_ids, x_t, conds[step])
            x_t = x_t + dt * v_t
        return x_t

    # -------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: Pi05Config | str | None = None, strict: bool = True,
                        dtype_policy: str = "float32", device: torch.device | str = "cpu") -> "Pi05":
        """Load openpi-converted (``model.safetensors``) or lerobot (``model.``-prefixed) weights.
        See :func:`quantvla_fx.models.pi05.checkpoint.load_checkpoint`."""
        return load_checkpoint(cls, path, config=config, strict=strict, dtype_policy=dtype_policy, device=device)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``model.safetensors`` (openpi key layout) and ``config.json`` into ``directory``."""
        return save_pi05(self, directory)


def _suffix_masks(batch: int, horizon: int, device):
    """Action-token pad mask (all valid) and block mask [1, 0, ..., 0]: one bidirectional block."""
    pad_masks = torch.ones(batch, horizon, dtype=torch.bool, device=device)
    att_masks = (torch.arange(horizon, device=device) == 0)[None, :].expand(batch, horizon)
    return pad_masks, att_masks


def _split_sample_args(args: tuple, noise, num_steps):
    rest = list(args)
    if rest and isinstance(rest[0], (torch.device, str)):
        rest = rest[1:]  # openpi: sample_actions(device, observation, ...)
    if not rest or len(rest) > 3:
        raise TypeError("sample_actions expects (observation, noise=None, num_steps=None) "
                        "or openpi's (device, observation, noise=None, num_steps=None)")
    if len(rest) > 1:
        if noise is not None:
            raise TypeError("sample_actions got noise both positionally and as a keyword")
        noise = rest[1]
    if len(rest) > 2:
        if num_steps is not None:
            raise TypeError("sample_actions got num_steps both positionally and as a keyword")
        num_steps = rest[2]
    if not isinstance(rest[0], Observation) and not hasattr(rest[0], "images"):
        raise TypeError(f"sample_actions needs an Observation, got {type(rest[0]).__name__}")
    return rest[0], noise, num_steps
