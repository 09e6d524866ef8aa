"""Pi05Config: every size of the Pi0.5 model, presets, and JSON (golden / openpi / lerobot formats)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping


class Pi05ConfigError(ValueError):
    """A Pi05Config value, preset or config file is invalid; the message names the field or file."""


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma decoder stack (the PaliGemma LM or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# openpi's src/openpi/models/gemma.py::get_config, plus the golden test's two tiny variants.
GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(2048, 18, 16384, 8, 1, 256),
    "gemma_300m": GemmaConfig(1024, 18, 4096, 8, 1, 256),
    "dummy": GemmaConfig(64, 4, 128, 8, 1, 16),
    "golden_lm_tiny": GemmaConfig(64, 2, 128, 2, 1, 32),
    "golden_ex_tiny": GemmaConfig(32, 2, 64, 2, 1, 32),
}

SUPPORTED_ACTIVATION = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (defaults: So400m/14 as openpi builds it, intermediate 4304)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    projection_dim: int = 2048  # projector output = LM width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Pi05Config:
    """All numbers that shape a Pi0.5 model. Defaults are the full-size pi05_base model."""

    llm: GemmaConfig = GEMMA_VARIANTS["gemma_2b"]
    expert: GemmaConfig = GEMMA_VARIANTS["gemma_300m"]
    vision: VisionConfig = field(default_factory=VisionConfig)
    vocab_size: int = 257152
    action_dim: int = 32
    action_horizon: int = 50
    num_steps: int = 10
    max_token_len: int = 200  # informational: the prefix length follows the prompt tensor
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    time_min_period: float = 4e-3
    time_max_period: float = 4.0

    def __post_init__(self):
        _validate(self)

    # ----------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, **overrides) -> "Pi05Config":
        """Exactly the golden ``pi05_tiny`` config (random-weight test model)."""
        base = cls(
            llm=GEMMA_VARIANTS["golden_lm_tiny"],
            expert=GEMMA_VARIANTS["golden_ex_tiny"],
            vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, projection_dim=64),
            vocab_size=1024,
            action_horizon=10,
        )
        return base.with_overrides(**overrides)

    @classmethod
    def pi05_base(cls, **overrides) -> "Pi05Config":
        """Full size, action horizon 50 (the pi05_base checkpoint, default Pi0Config)."""
        return cls(action_horizon=50).with_overrides(**overrides)

    @classmethod
    def pi05_libero(cls, **overrides) -> "Pi05Config":
        """Full size, action horizon 10."""
        return cls(action_horizon=10).with_overrides(**overrides)

    @classmethod
    def pi05_droid(cls, **overrides) -> "Pi05Config":
        """Full size, action horizon 15."""
        return cls(action_horizon=15).with_overrides(**overrides)

    def mlp_gemm_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of the GEMMs W4A8 targets first: the GeGLU MLPs of the LM and the expert."""
        lm, ex = self.llm, self.expert
        return {"lm_gate_up": (lm.mlp_dim, lm.width), "lm_down": (lm.width, lm.mlp_dim),
                "expert_gate_up": (ex.mlp_dim, ex.width), "expert_down": (ex.width, ex.mlp_dim)}

    @classmethod
    def preset(cls, name: str, **overrides) -> "Pi05Config":
        presets = {"tiny": cls.tiny, "pi05_tiny": cls.tiny, "pi05_base": cls.pi05_base,
                   "pi05_libero": cls.pi05_libero, "pi05_droid": cls.pi05_droid}
        if name not in presets:
            raise Pi05ConfigError(f"unknown Pi05Config preset {name!r}; known: {sorted(presets)}")
        return presets[name](**overrides)

    def with_overrides(self, *, vision_layers: int | None = None, llm_depth: int | None = None,
                       expert_depth: int | None = None, **fields: Any) -> "Pi05Config":
        """Copy with smaller/larger stacks (e.g. ``vision_layers=2`` for a quick full-width run)
        and/or any top-level field replaced."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise Pi05ConfigError(f"unknown Pi05Config field(s): {sorted(unknown)}")
        cfg = self
        if vision_layers is not None:
            fields["vision"] = dataclasses.replace(fields.get("vision", cfg.vision), num_hidden_layers=vision_layers)
        if llm_depth is not None:
            fields["llm"] = dataclasses.replace(fields.get("llm", cfg.llm), depth=llm_depth)
        if expert_depth is not None:
            fields["expert"] = dataclasses.replace(fields.get("expert", cfg.expert), depth=expert_depth)
        return dataclasses.replace(cfg, **fields) if fields else cfg

    # -------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pi05": True}
        for name, variant in GEMMA_VARIANTS.items():  # lets openpi-style readers find the variant
            if variant == self.llm and "paligemma_variant" not in d:
                d["paligemma_variant"] = name
            if variant == self.expert and "action_expert_variant" not in d:
                d["action_expert_variant"] = name
        d.update(
            action_dim=self.action_dim,
            action_horizon=self.action_horizon,
            num_steps=self.num_steps,
            max_token_len=self.max_token_len,
            llm=dataclasses.asdict(self.llm),
            expert=dataclasses.asdict(self.expert),
            vision={**dataclasses.asdict(self.vision), "hidden_act": SUPPORTED_ACTIVATION},
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            time_min_period=self.time_min_period,
            time_max_period=self.time_max_period,
        )
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "Pi05Config":
        """Read a config from a JSON file path or a JSON string."""
        text = str(path_or_text)
        source = "<json string>"
        if not text.lstrip().startswith("{"):
            source = text
            try:
                with open(path_or_text) as f:
                    text = f.read()
            except OSError as e:
                raise Pi05ConfigError(f"cannot read config file {source}: {e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise Pi05ConfigError(f"{source}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except Pi05ConfigError as e:
            raise Pi05ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Pi05Config":
        """Accept our/golden format (``llm``/``expert``/``vision`` dicts), openpi's converter
        format (``paligemma_variant``, ``action_expert_variant``, ``action_horizon``) and lerobot's
        ``config.json`` (``type: pi05``, ``chunk_size``, ``max_action_dim``)."""
        if not isinstance(d, Mapping):
            raise Pi05ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        if d.get("pi05") is False:
            raise Pi05ConfigError("config has pi05=false: this is a pi0 model, which Pi05 does not implement")
        if d.get("type") not in (None, "pi05"):
            raise Pi05ConfigError(f"config type {d.get('type')!r} is not 'pi05'")
        kw: dict[str, Any] = {}
        kw["llm"] = _gemma_from(d, "llm", "paligemma_variant")
        kw["expert"] = _gemma_from(d, "expert", "action_expert_variant")
        if "vision" in d:
            vision = dict(d["vision"])
            act = vision.pop("hidden_act", SUPPORTED_ACTIVATION)
            if act != SUPPORTED_ACTIVATION:
                raise Pi05ConfigError(f"vision.hidden_act {act!r} is not supported (only {SUPPORTED_ACTIVATION!r})")
            kw["vision"] = _build(VisionConfig, vision, "vision")
        else:  # openpi/lerobot formats: SigLIP So400m projected to the LM width
            kw["vision"] = VisionConfig(projection_dim=kw["llm"].width)
        aliases = {"chunk_size": "action_horizon", "max_action_dim": "action_dim",
                   "num_inference_steps": "num_steps", "tokenizer_max_length": "max_token_len"}
        for src, dst in aliases.items():
            if src in d and dst not in d:
                kw[dst] = d[src]
        for f in ("vocab_size", "action_dim", "action_horizon", "num_steps", "max_token_len",
                  "rms_norm_eps", "rope_theta", "time_min_period", "time_max_period"):
            if f in d:
                kw[f] = d[f]
        return cls(**kw)


def _gemma_from(d: Mapping[str, Any], key: str, variant_key: str) -> GemmaConfig:
    if key in d:
        return _build(GemmaConfig, d[key], key)
    variant = d.get(variant_key, "gemma_2b" if key == "llm" else "gemma_300m")
    if variant not in GEMMA_VARIANTS:
        raise Pi05ConfigError(f"{variant_key} {variant!r} is unknown; known: {sorted(GEMMA_VARIANTS)}")
    return GEMMA_VARIANTS[variant]


def _build(klass, values: Any, where: str):
    if not isinstance(values, Mapping):
        raise Pi05ConfigError(f"{where} must be an object, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - names
    if unknown:
        raise Pi05ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(names)}")
    try:
        return klass(**values)
    except TypeError as e:
        raise Pi05ConfigError(f"{where}: {e}") from e


def _validate(cfg: Pi05Config) -> None:
    for name, g in (("llm", cfg.llm), ("expert", cfg.expert)):
        for f in dataclasses.fields(g):
            v = getattr(g, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise Pi05ConfigError(f"{name}.{f.name} must be a positive int, got {v!r}")
        if g.num_heads % g.num_kv_heads:
            raise Pi05ConfigError(f"{name}.num_heads ({g.num_heads}) must be a multiple of num_kv_heads ({g.num_kv_heads})")
        if g.head_dim % 2:
            raise Pi05ConfigError(f"{name}.head_dim must be even for RoPE, got {g.head_dim}")
    # The expert attends over the LM's cached K/V, so the KV layout must agree.
    if (cfg.llm.head_dim, cfg.llm.num_kv_heads) != (cfg.expert.head_dim, cfg.expert.num_kv_heads):
        raise Pi05ConfigError("llm and expert must share head_dim and num_kv_heads (joint attention over the KV cache)")
    if cfg.expert.depth > cfg.llm.depth:
        raise Pi05ConfigError(f"expert.depth ({cfg.expert.depth}) exceeds llm.depth ({cfg.llm.depth}): no KV cache for the extra layers")
    v = cfg.vision
    if v.hidden_size % v.num_attention_heads:
        raise Pi05ConfigError(f"vision.hidden_size ({v.hidden_size}) must be divisible by num_attention_heads ({v.num_attention_heads})")
    if v.image_size % v.patch_size:
        raise Pi05ConfigError(f"vision.image_size ({v.image_size}) must be a multiple of patch_size ({v.patch_size})")
    if v.projection_dim != cfg.llm.width:
        raise Pi05ConfigError(f"vision.projection_dim ({v.projection_dim}) must equal llm.width ({cfg.llm.width})")
    for f in ("vocab_size", "action_dim", "action_horizon", "num_steps"):
        val = getattr(cfg, f)
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise Pi05ConfigError(f"{f} must be a positive int, got {val!r}")
    if cfg.expert.width % 2:
        raise Pi05ConfigError("expert.width must be even (sin/cos time embedding)")
