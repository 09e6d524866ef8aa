"""Pi05 checkpoints: openpi / lerobot layouts, tied embedding, round trip, dtype policy, bad files."""
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from quantvla_fx.models.pi05 import CheckpointError, Pi05, Pi05Config
from quantvla_fx.models.pi05.initialization import init_weights
from quantvla_fx.models.pi05.paligemma import EMBED_KEY, LM_HEAD_KEY

Q_PROJ = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight"
DENSE = "paligemma_with_expert.gemma_expert.model.layers.1.post_attention_layernorm.dense.weight"


GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"  # openpi's real checkpoint (see its README.md)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = Pi05(Pi05Config.tiny())
    init_weights(model, std=0.2)
    return model


@pytest.fixture(scope="module")
def state(source):
    """The model's weights, the tied embedding under both names, as independent tensors."""
    return {k: v.detach().clone() for k, v in source.state_dict().items()}


def _write(path: Path, tensors: dict, config: Pi05Config | None = Pi05Config.tiny()) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        config.to_json(path / "config.json")
    return path


def _assert_weights_equal(model: Pi05, state: dict):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    emb = model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight
    assert model.paligemma_with_expert.paligemma.lm_head.weight is emb  # still tied


# ----------------------------------------------------------------- layouts
def test_openpi_golden_file_loads_with_exact_keys():
    golden = GOLDEN
    model = Pi05.from_pretrained(golden)
    file_tensors = load_file(str(golden / "model.safetensors"))
    assert EMBED_KEY not in file_tensors and LM_HEAD_KEY in file_tensors  # the dropped tied duplicate
    assert set(model.state_dict()) == set(file_tensors) | {EMBED_KEY}
    expected = dict(file_tensors, **{EMBED_KEY: file_tensors[LM_HEAD_KEY]})
    _assert_weights_equal(model, expected)
    assert not model.training


def test_safetensors_save_model_layout(tmp_path, source, state):
    """openpi's converter writes with safetensors.torch.save_model (drops one tied name)."""
    tmp_path.mkdir(exist_ok=True)
    save_model(source, str(tmp_path / "model.safetensors"))
    Pi05Config.tiny().to_json(tmp_path / "config.json")
    _assert_weights_equal(Pi05.from_pretrained(tmp_path), state)


def test_lerobot_model_prefix(tmp_path, state):
    prefixed = {"model." + k: v for k, v in state.items() if k != EMBED_KEY}
    _write(tmp_path, prefixed)
    _assert_weights_equal(Pi05.from_pretrained(tmp_path / "model.safetensors"), state)


@pytest.mark.parametrize("keep", ["embed_tokens", "lm_head", "both"])
def test_tied_embedding_from_either_name(tmp_path, state, keep):
    drop = {"embed_tokens": [LM_HEAD_KEY], "lm_head": [EMBED_KEY], "both": []}[keep]
    _write(tmp_path, {k: v for k, v in state.items() if k not in drop})
    _assert_weights_equal(Pi05.from_pretrained(tmp_path), state)


def test_tied_names_with_different_values_are_refused(tmp_path, state):
    bad = dict(state)
    bad[LM_HEAD_KEY] = state[LM_HEAD_KEY] + 1
    _write(tmp_path, bad)
    with pytest.raises(CheckpointError, match="lm_head.weight.*differ"):
        Pi05.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path, state):
    keys = sorted(k for k in state if k != EMBED_KEY)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_weights_equal(Pi05.from_pretrained(tmp_path, config=Pi05Config.tiny()), state)


# -------------------------------------------------------------- round trip
def test_save_load_round_trip(tmp_path, source, state):
    source.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        header_config = f.metadata()["config"]
    assert EMBED_KEY not in keys and LM_HEAD_KEY in keys  # same layout as openpi's files
    assert Pi05Config.from_json(tmp_path / "config.json") == source.config
    assert Pi05Config.from_json(header_config) == source.config
    _assert_weights_equal(Pi05.from_pretrained(tmp_path), state)


def test_config_from_header_when_no_config_json(tmp_path, source, state):
    source.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    model = Pi05.from_pretrained(tmp_path)
    assert model.config == source.config
    _assert_weights_equal(model, state)


def test_explicit_config_or_preset_wins(tmp_path, state):
    _write(tmp_path, state, config=None)
    assert Pi05.from_pretrained(tmp_path, config="tiny").config == Pi05Config.tiny()
    assert Pi05.from_pretrained(tmp_path, config=Pi05Config.tiny()).config == Pi05Config.tiny()


# ------------------------------------------------------------ dtype policy
def test_openpi_bf16_dtype_policy(tmp_path, source, state):
    source.save_pretrained(tmp_path)
    model = Pi05.from_pretrained(tmp_path, dtype_policy="openpi_bf16")
    params = dict(model.named_parameters())
    fp32 = {n for n, p in params.items() if p.dtype == torch.float32}
    assert all(p.dtype in (torch.float32, torch.bfloat16) for p in params.values())
    fp32_rule = re.compile(r"^(action_|time_mlp_)|embeddings\.(patch|position)_embedding\."
                           r"|(input|post_attention)_layernorm\.|language_model\.norm\.|gemma_expert\.model\.norm\.")
    expected_fp32 = {n for n in params if fp32_rule.search(n)}
    assert len(expected_fp32) == 26  # 8 top-level, 3 SigLIP embedding, 5 LM norms, 10 adaRMS dense
    assert fp32 == expected_fp32
    assert params[Q_PROJ].dtype == torch.bfloat16
    assert params[DENSE].dtype == torch.float32
    # Like openpi (bf16 first, then back to fp32): fp32 params in paligemma_with_expert are
    # bf16-representable; the time MLP (outside it) keeps full precision.
    assert torch.equal(params[DENSE], state[DENSE].bfloat16().float())
    assert torch.equal(params["time_mlp_in.weight"], state["time_mlp_in.weight"])


def test_unknown_dtype_policy(tmp_path, state):
    _write(tmp_path, state)
    with pytest.raises(ValueError, match="dtype_policy"):
        Pi05.from_pretrained(tmp_path, dtype_policy="float16")


# --------------------------------------------------------- bad checkpoints
def test_missing_key_names_key_and_file(tmp_path, state):
    _write(tmp_path, {k: v for k, v in state.items() if k != Q_PROJ})
    with pytest.raises(CheckpointError) as err:
        Pi05.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing keys (1)" in msg and Q_PROJ in msg and str(tmp_path / "model.safetensors") in msg


def test_unexpected_key_is_refused_when_strict(tmp_path, state):
    _write(tmp_path, dict(state, **{"state_proj.weight": torch.zeros(4, 4)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    state_proj.weight"):
        Pi05.from_pretrained(tmp_path)


def test_non_strict_initialises_missing_and_ignores_unexpected(tmp_path, state, caplog):
    tensors = {k: v for k, v in state.items() if k != Q_PROJ}
    tensors["state_proj.weight"] = torch.zeros(4, 4)
    _write(tmp_path, tensors)
    with caplog.at_level(logging.WARNING, logger="quantvla_fx"):
        model = Pi05.from_pretrained(tmp_path, strict=False)
    assert Q_PROJ in caplog.text and "state_proj.weight" in caplog.text
    weights = model.state_dict()
    assert not any(v.is_meta for v in weights.values())
    assert torch.isfinite(weights[Q_PROJ]).all() and weights[Q_PROJ].std() > 0
    assert torch.equal(weights[DENSE], state[DENSE])


def test_wrong_shape_names_key_and_shapes(tmp_path, state):
    _write(tmp_path, dict(state, **{Q_PROJ: torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError) as err:
        Pi05.from_pretrained(tmp_path, strict=False)  # shape errors are never tolerated
    msg = str(err.value)
    assert f"{Q_PROJ}: checkpoint [64, 32] vs model [64, 64]" in msg and "model.safetensors" in msg


def test_wrong_dtype_names_key(tmp_path, state):
    _write(tmp_path, dict(state, **{DENSE: state[DENSE].to(torch.int64)}))
    with pytest.raises(CheckpointError) as err:
        Pi05.from_pretrained(tmp_path)
    msg = str(err.value)
    assert f"{DENSE}: I64" in msg and "model.safetensors" in msg


def test_truncated_file_names_file(tmp_path, state):
    _write(tmp_path, state)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file.*truncated"):
        Pi05.from_pretrained(tmp_path)


def test_garbage_file_names_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        Pi05.from_pretrained(tmp_path, config="tiny")


def test_pickle_and_missing_paths_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        Pi05.from_pretrained(tmp_path / "model.bin", config="tiny")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Pi05.from_pretrained(tmp_path, config="tiny")
    with pytest.raises(CheckpointError, match="no such file"):
        Pi05.from_pretrained(tmp_path / "nope.safetensors", config="tiny")


def test_no_config_anywhere(tmp_path, state):
    _write(tmp_path, state, config=None)
    with pytest.raises(CheckpointError, match="no config.json beside .*model.safetensors"):
        Pi05.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="neither a config file nor a preset"):
        Pi05.from_pretrained(tmp_path, config="pi05_nonexistent")
