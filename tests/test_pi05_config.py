"""Pi05Config presets and JSON, and the full-size module tree (built on the meta device)."""
import json

import pytest
import torch
from torch import nn

from quantvla_fx.models.pi05 import Pi05ConfigError as ConfigError
from quantvla_fx.models.pi05 import GemmaConfig, Pi05, Pi05Config, VisionConfig
from quantvla_fx.models.pi05.gemma import GemmaRMSNorm

P = "paligemma_with_expert."


def test_tiny_is_the_golden_config():
    cfg = Pi05Config.tiny()
    assert cfg.llm == GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32)
    assert cfg.expert == GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=32)
    assert cfg.vision == VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, projection_dim=64)
    assert (cfg.vocab_size, cfg.action_dim, cfg.action_horizon, cfg.num_steps) == (1024, 32, 10, 10)


@pytest.mark.parametrize("preset,horizon", [("pi05_libero", 10), ("pi05_droid", 15), ("pi05_base", 50)])
def test_full_size_presets(preset, horizon):
    cfg = Pi05Config.preset(preset)
    assert cfg.action_horizon == horizon and cfg.action_dim == 32
    assert cfg.llm == GemmaConfig(2048, 18, 16384, 8, 1, 256)
    assert cfg.expert == GemmaConfig(1024, 18, 4096, 8, 1, 256)
    assert cfg.vision == VisionConfig()  # So400m/14: 1152 / 4304 / 27 layers / 16 heads
    assert (cfg.vision.num_hidden_layers, cfg.vision.intermediate_size, cfg.vocab_size) == (27, 4304, 257152)


def test_overrides():
    cfg = Pi05Config.pi05_libero(vision_layers=2, llm_depth=3, expert_depth=3, action_horizon=12)
    assert (cfg.vision.num_hidden_layers, cfg.llm.depth, cfg.expert.depth, cfg.action_horizon) == (2, 3, 3, 12)
    assert cfg.llm.width == 2048 and cfg.vision.hidden_size == 1152
    with pytest.raises(ConfigError, match="unknown Pi05Config field"):
        Pi05Config.tiny(horizon=3)


@pytest.mark.parametrize("preset", ["tiny", "pi05_libero", "pi05_droid", "pi05_base"])
def test_json_round_trip(tmp_path, preset):
    cfg = Pi05Config.preset(preset, vision_layers=3)
    assert Pi05Config.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "config.json")
    assert Pi05Config.from_json(tmp_path / "config.json") == cfg


def test_openpi_converter_config_json():
    text = json.dumps({"action_dim": 32, "action_horizon": 10, "paligemma_variant": "gemma_2b",
                       "action_expert_variant": "gemma_300m", "precision": "bfloat16"})
    assert Pi05Config.from_json(text) == Pi05Config.pi05_libero()


def test_lerobot_config_json():
    text = json.dumps({"type": "pi05", "chunk_size": 50, "n_action_steps": 50, "max_action_dim": 32,
                       "max_state_dim": 32, "num_inference_steps": 10, "paligemma_variant": "gemma_2b",
                       "action_expert_variant": "gemma_300m", "tokenizer_max_length": 200, "dtype": "float32"})
    assert Pi05Config.from_json(text) == Pi05Config.pi05_base()
    with pytest.raises(ConfigError, match="type 'pi0' is not 'pi05'"):
        Pi05Config.from_json(json.dumps({"type": "pi0"}))


@pytest.mark.parametrize("change,message", [
    ({"expert": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}},
     "share head_dim and num_kv_heads"),
    ({"llm": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 3, "num_kv_heads": 2, "head_dim": 32}},
     "multiple of num_kv_heads"),
    ({"llm": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 2, "num_kv_heads": 1, "head_dim": 32,
              "widht": 3}}, r"llm: unknown field\(s\) \['widht'\]"),
    ({"vision": {"hidden_size": 32, "projection_dim": 32}}, "projection_dim .* must equal llm.width"),
    ({"vision": {"hidden_act": "relu"}}, "hidden_act 'relu' is not supported"),
    ({"action_horizon": 0}, "action_horizon must be a positive int"),
    ({"paligemma_variant": "gemma_7b", "llm": None}, "paligemma_variant 'gemma_7b' is unknown"),
])
def test_invalid_configs_name_the_field(change, message):
    d = Pi05Config.tiny().to_dict()
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        Pi05Config.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown Pi05Config preset 'pi0_base'"):
        Pi05Config.preset("pi0_base")


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        return Pi05(Pi05Config.pi05_base())


def test_full_size_parameter_count(full_model):
    unique = {id(p): p.numel() for p in full_model.parameters()}
    assert sum(unique.values()) == 3_616_757_520  # openpi's PI0Pytorch(pi05) [research/pi05.md §1.3]


def test_full_size_linear_counts(full_model):
    linears = [n for n, m in full_model.named_modules() if isinstance(m, nn.Linear)]
    assert sum(".language_model." in n for n in linears) == 126
    assert sum(".gemma_expert.model.layers." in n and not n.endswith(".dense") for n in linears) == 126
    assert sum(".vision_tower." in n for n in linears) == 162
    assert sum(n.endswith(".dense") for n in linears) == 37
    assert len(linears) == 162 + 1 + 126 + 126 + 37 + 4 + 2


@pytest.mark.parametrize("fqn,kind,shape", [
    (P + "paligemma.model.vision_tower.vision_model.embeddings.patch_embedding", nn.Conv2d, (1152, 3, 14, 14)),
    (P + "paligemma.model.vision_tower.vision_model.embeddings.position_embedding", nn.Embedding, (256, 1152)),
    (P + "paligemma.model.vision_tower.vision_model.encoder.layers.26.self_attn.out_proj", nn.Linear, (1152, 1152)),
    (P + "paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc2", nn.Linear, (1152, 4304)),
    (P + "paligemma.model.vision_tower.vision_model.post_layernorm", nn.LayerNorm, (1152,)),
    (P + "paligemma.model.multi_modal_projector.linear", nn.Linear, (2048, 1152)),
    (P + "paligemma.model.language_model.embed_tokens", nn.Embedding, (257152, 2048)),
    (P + "paligemma.model.language_model.layers.17.self_attn.k_proj", nn.Linear, (256, 2048)),
    (P + "paligemma.model.language_model.layers.17.mlp.gate_proj", nn.Linear, (16384, 2048)),
    (P + "paligemma.model.language_model.layers.17.mlp.down_proj", nn.Linear, (2048, 16384)),
    (P + "paligemma.model.language_model.layers.0.input_layernorm", GemmaRMSNorm, (2048,)),
    (P + "paligemma.model.language_model.norm", GemmaRMSNorm, (2048,)),
    (P + "paligemma.lm_head", nn.Linear, (257152, 2048)),
    (P + "gemma_expert.model.layers.17.self_attn.q_proj", nn.Linear, (2048, 1024)),
    (P + "gemma_expert.model.layers.17.self_attn.o_proj", nn.Linear, (1024, 2048)),
    (P + "gemma_expert.model.layers.17.mlp.up_proj", nn.Linear, (4096, 1024)),
    (P + "gemma_expert.model.layers.0.input_layernorm.dense", nn.Linear, (3072, 1024)),
    (P + "gemma_expert.model.layers.0.post_attention_layernorm.dense", nn.Linear, (3072, 1024)),
    (P + "gemma_expert.model.norm.dense", nn.Linear, (3072, 1024)),
    (P + "gemma_expert.lm_head", nn.Linear, (257152, 1024)),
    ("action_in_proj", nn.Linear, (1024, 32)),
    ("action_out_proj", nn.Linear, (32, 1024)),
    ("time_mlp_in", nn.Linear, (1024, 1024)),
    ("time_mlp_out", nn.Linear, (1024, 1024)),
])
def test_openpi_module_names(full_model, fqn, kind, shape):
    module = full_model.get_submodule(fqn)
    assert type(module) is kind
    assert tuple(module.weight.shape) == shape


def test_expert_norms_are_adaptive_only(full_model):
    keys = full_model.state_dict().keys()
    assert not any(k.startswith(P + "gemma_expert.") and k.endswith("layernorm.weight") for k in keys)
    assert P + "gemma_expert.model.embed_tokens.weight" not in keys  # openpi sets it to None
    assert not any("position_ids" in k or "inv_freq" in k for k in keys)  # no persistent buffers


def test_mlp_gemm_shapes_follow_the_config():
    shapes = Pi05Config.pi05_libero().mlp_gemm_shapes()
    assert shapes == {"lm_gate_up": (16384, 2048), "lm_down": (2048, 16384),
                      "expert_gate_up": (4096, 1024), "expert_down": (1024, 4096)}
    assert Pi05Config.tiny().mlp_gemm_shapes()["lm_down"] == (64, 128)
