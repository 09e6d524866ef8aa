"""openpi's ``Observation`` (same field names) and the part of its preprocessing that the model
needs: fixed camera order, missing cameras as masked zero images, channels-first float images."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional

import torch

# openpi's IMAGE_KEYS: the order of the image blocks in the prefix.
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass
class Observation:
    images: dict[str, torch.Tensor]  # (B, 3, H, W) float in [-1, 1] (or (B, H, W, 3))
    image_masks: dict[str, torch.Tensor]  # (B,) bool
    state: Optional[torch.Tensor]  # (B, state_dim); Pi0.5 reads only its batch size
    tokenized_prompt: torch.Tensor  # (B, L) int
    tokenized_prompt_mask: torch.Tensor  # (B, L) bool
    token_ar_mask: Optional[torch.Tensor] = None  # unused at inference
    token_loss_mask: Optional[torch.Tensor] = None  # unused at inference

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Observation":
        """Build from openpi's dict layout (``image``/``image_mask`` dicts) or a flat one
        (``images.<cam>``, ``image_masks.<cam>``). uint8 images become ``x/255·2−1`` like openpi's
        ``Observation.from_dict``."""
        images = dict(data.get("image", data.get("images", {})))
        masks = dict(data.get("image_mask", data.get("image_masks", {})))
        for key, value in data.items():
            if key.startswith("images."):
                images[key[len("images."):]] = value
            elif key.startswith("image_masks."):
                masks[key[len("image_masks."):]] = value
        for name in ("tokenized_prompt", "tokenized_prompt_mask"):
            if name not in data:
                raise KeyError(f"observation dict has no {name!r} (keys: {sorted(data)})")
        images = {k: _uint8_to_float(torch.as_tensor(v)) for k, v in images.items()}
        masks = {k: torch.as_tensor(v) for k, v in masks.items()}
        return cls(
            images=images,
            image_masks=masks,
            state=None if data.get("state") is None else torch.as_tensor(data["state"]),
            tokenized_prompt=torch.as_tensor(data["tokenized_prompt"]),
            tokenized_prompt_mask=torch.as_tensor(data["tokenized_prompt_mask"]),
            token_ar_mask=data.get("token_ar_mask"),
            token_loss_mask=data.get("token_loss_mask"),
        )

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "Observation":
        """Read a flat safetensors file such as the golden ``inputs.safetensors`` (extra keys,
        e.g. ``noise``, are ignored)."""
        from safetensors.torch import load_file

        data = load_file(str(path), device=str(device) if device is not None else "cpu")
        return cls.from_dict(data)

    def to(self, device: torch.device | str) -> "Observation":
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def _uint8_to_float(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 255.0 * 2.0 - 1.0
    return image


def preprocess_observation(obs: Observation, image_size: int, num_channels: int = 3):
    """-> (images, image_masks, lang_tokens, lang_masks, state), images in IMAGE_KEYS order.

    Identity for (B, 3, S, S) float inputs with S = image_size, as openpi's
    ``preprocess_observation_pytorch(train=False)``. A missing camera becomes a zero image
    with mask False; a missing mask means all True. Resizing is not implemented.
    """
    unknown = [k for k in obs.images if k not in IMAGE_KEYS]
    if unknown:
        raise ValueError(f"unknown camera key(s) {unknown}; expected a subset of {list(IMAGE_KEYS)}")
    tokens = obs.tokenized_prompt
    if tokens.ndim != 2:
        raise ValueError(f"tokenized_prompt must be (B, L), got shape {tuple(tokens.shape)}")
    if tuple(obs.tokenized_prompt_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"tokenized_prompt_mask shape {tuple(obs.tokenized_prompt_mask.shape)} "
                         f"!= tokenized_prompt shape {tuple(tokens.shape)}")
    batch = tokens.shape[0]
    device = tokens.device

    images, masks = [], []
    for key in IMAGE_KEYS:
        image = obs.images.get(key)
        if image is None:
            images.append(torch.zeros(batch, num_channels, image_size, image_size, device=device))
            masks.append(torch.zeros(batch, dtype=torch.bool, device=device))
            continue
        images.append(_check_image(key, image, batch, image_size, num_channels))
        mask = obs.image_masks.get(key)
        if mask is None:
            mask = torch.ones(batch, dtype=torch.bool, device=device)
        elif tuple(mask.shape) != (batch,):
            raise ValueError(f"image_masks[{key!r}] must have shape ({batch},), got {tuple(mask.shape)}")
        masks.append(mask.to(torch.bool))
    return images, masks, tokens, obs.tokenized_prompt_mask.to(torch.bool), obs.state


def _check_image(key: str, image: torch.Tensor, batch: int, size: int, channels: int) -> torch.Tensor:
    if image.ndim != 4 or image.shape[0] != batch:
        raise ValueError(f"images[{key!r}] must be (B={batch}, {channels}, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"images[{key!r}] has dtype {image.dtype}; the model expects float images in [-1, 1] "
                         "(Observation.from_dict converts uint8)")
    if image.shape[1] != channels and image.shape[-1] == channels:
        image = image.permute(0, 3, 1, 2)  # channels-last -> channels-first, like openpi
    if image.shape[1] != channels:
        raise ValueError(f"images[{key!r}] has no {channels}-channel axis: shape {tuple(image.shape)}")
    if image.shape[2] != size or image.shape[3] != size:
        raise ValueError(f"images[{key!r}] is {image.shape[2]}x{image.shape[3]} (shape {tuple(image.shape)}); "
                         f"resizing is not implemented, resize with padding to {size}x{size} first "
                         "(openpi's resize_with_pad)")
    return image


def random_observation(cfg, batch: int, device, valid_tokens: int = 48) -> "Observation":
    """Random images in [-1, 1], all cameras present, random prompt ids (``valid_tokens`` valid):
    inputs for benchmarks and examples without a dataset."""
    g = torch.Generator(device="cpu").manual_seed(0)
    size = cfg.vision.image_size
    images = {k: (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device) for k in IMAGE_KEYS}
    masks = {k: torch.ones(batch, dtype=torch.bool, device=device) for k in IMAGE_KEYS}
    tokens = torch.randint(0, min(1000, cfg.vocab_size), (batch, cfg.max_token_len), generator=g).to(device)
    tmask = torch.zeros(batch, cfg.max_token_len, dtype=torch.bool, device=device)
    tmask[:, :valid_tokens] = True
    return Observation(images, masks, torch.zeros(batch, 32, device=device), tokens, tmask)


def jittered(obs: "Observation", seed: int, amount: float = 0.1) -> "Observation":
    """Another plausible observation for calibration: the same prompt, the images moved by
    ``amount`` x N(0, 1) noise (seeded, drawn on the CPU) and clamped to [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    images = {k: (v + amount * torch.randn(v.shape, generator=g).to(v.device)).clamp(-1, 1)
              for k, v in obs.images.items()}
    return replace(obs, images=images)
