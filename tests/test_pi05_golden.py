"""Pi05 against openpi's own outputs (tests/data/pi05_tiny): eager, Inductor, graph breaks."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantvla_fx.models.pi05 import IMAGE_KEYS, Observation, Pi05, Pi05Config
from quantvla_fx.models.pi05.schedule import float32_euler_schedule

ATOL = 1e-4  # the golden README's suggested tolerance (observed: ~1e-6)


# openpi's real Pi0.5 outputs, shipped with the repository (provenance: data/pi05_tiny/README.md).
GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def model():
    return Pi05.from_pretrained(GOLDEN)


@pytest.fixture(scope="module")
def inputs():
    return Observation.from_safetensors(GOLDEN / "inputs.safetensors"), load_file(str(GOLDEN / "inputs.safetensors"))["noise"]


@pytest.fixture(scope="module")
def expected():
    return load_file(str(GOLDEN / "expected.safetensors"))


@pytest.fixture(scope="module")
def prefix(model, inputs):
    obs, _ = inputs
    with torch.no_grad():
        embs, pad, att = model.embed_prefix([obs.images[k] for k in IMAGE_KEYS], [obs.image_masks[k] for k in IMAGE_KEYS],
                                            obs.tokenized_prompt, obs.tokenized_prompt_mask)
        kv = model.forward_prefix(embs, pad, att)
    return embs, pad, att, kv


def test_config_is_the_golden_config(model):
    assert model.config == Pi05Config.tiny()
    assert Pi05Config.from_json(GOLDEN / "config.json") == Pi05Config.tiny()


def test_eager_actions_match_openpi(model, inputs, expected):
    obs, noise = inputs
    actions = model.sample_actions(obs, noise=noise, num_steps=10)
    assert actions.dtype == torch.float32 and actions.shape == (2, 10, 32)
    err = _max_err(actions, expected["actions"])
    print(f"eager max abs error: {err:.3e}")
    assert err <= ATOL


def test_openpi_call_form(model, inputs, expected):
    obs, noise = inputs
    actions = model.sample_actions(torch.device("cpu"), obs, noise=noise, num_steps=10)
    assert _max_err(actions, expected["actions"]) <= ATOL


def test_vision_tower_outputs(model, inputs, expected):
    obs, _ = inputs
    tower = model.paligemma_with_expert.paligemma.model.vision_tower
    with torch.no_grad():
        for cam in IMAGE_KEYS:
            assert _max_err(tower(obs.images[cam]), expected[f"vision_tower_out.{cam}"]) <= ATOL, cam


def test_prefix_embeddings_and_masks(prefix, expected):
    embs, pad, att, _ = prefix
    assert _max_err(embs, expected["prefix_embs"]) <= ATOL
    assert torch.equal(pad, expected["prefix_pad_masks"])
    assert torch.equal(att, expected["prefix_att_masks"])
    assert torch.equal(torch.cumsum(pad, dim=1) - 1, expected["prefix_position_ids"])


def test_kv_cache_at_valid_positions(prefix, expected):
    _, pad, _, kv = prefix
    assert len(kv) == 2
    valid = pad[:, None, :, None]  # padded rows are implementation artefacts (README note 6)
    for i, (k, v) in enumerate(kv):
        assert k.shape == (2, 1, 968, 32)
        for name, got in (("key", k), ("value", v)):
            ref = expected[f"prefix_kv_cache.layer{i}.{name}"]
            assert torch.isfinite(got).all()
            assert ((got - ref).abs() * valid).max().item() <= ATOL, (i, name)


def test_suffix_step0(model, inputs, expected):
    _, noise = inputs
    t = torch.ones(2)
    with torch.no_grad():
        embs, pad, att, cond = model.embed_suffix(None, noise, t)
    assert _max_err(embs, expected["suffix_embs_step0"]) <= ATOL
    assert _max_err(cond, expected["adarms_cond_step0"]) <= ATOL
    assert pad.all() and att.tolist() == [[True] + [False] * 9] * 2
    _, positions = model.suffix_attention_inputs(expected["prefix_pad_masks"])
    assert torch.equal(positions, expected["suffix_position_ids_step0"])


def test_time_schedule_is_float32_accumulated(expected):
    dt, times = float32_euler_schedule(10)
    assert torch.equal(torch.tensor(times, dtype=torch.float32), expected["denoise.time"])
    assert dt == torch.tensor(-0.1, dtype=torch.float32).item()


def test_every_denoise_step(model, prefix, expected):
    _, pad, _, kv = prefix
    kv_before = [(k.clone(), v.clone()) for k, v in kv]
    with torch.no_grad():
        v0 = model.denoise_step(None, pad, kv, expected["denoise.x_t"][0], torch.ones(2))
        assert _max_err(v0, expected["v_t_step0"]) <= ATOL
        for step in range(10):
            t = expected["denoise.time"][step].expand(2)
            v = model.denoise_step(None, pad, kv, expected["denoise.x_t"][step], t)
            assert _max_err(v, expected["denoise.v_t"][step]) <= ATOL, step
    for (k, v), (k0, v0_) in zip(kv, kv_before):  # the cache is read, never written
        assert torch.equal(k, k0) and torch.equal(v, v0_)


def test_explain_shows_no_graph_breaks(model, inputs):
    obs, noise = inputs
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.sample_actions)(obs, noise=noise, num_steps=10)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_denoise_step_compiles_alone(model, prefix, expected):
    _, pad, _, kv = prefix
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.denoise_step)(None, pad, kv, expected["denoise.x_t"][0], torch.ones(2))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    step = torch.compile(model.denoise_step, fullgraph=True, backend="eager")
    with torch.no_grad():
        v0 = step(None, pad, kv, expected["denoise.x_t"][0], torch.ones(2))
    assert _max_err(v0, expected["v_t_step0"]) <= ATOL


def test_inductor_actions_match_openpi(model, inputs, expected):
    obs, noise = inputs
    torch._dynamo.reset()
    compiled = torch.compile(model.sample_actions, fullgraph=True)  # Inductor
    actions = compiled(obs, noise=noise, num_steps=10)
    err = _max_err(actions, expected["actions"])
    print(f"inductor max abs error: {err:.3e}")
    assert err <= ATOL


def test_openpi_bf16_policy_runs_close_to_fp32(inputs, expected):
    model = Pi05.from_pretrained(GOLDEN, dtype_policy="openpi_bf16")
    obs, noise = inputs
    actions = model.sample_actions(obs, noise=noise)
    assert actions.dtype == torch.float32
    err = _max_err(actions, expected["actions"])
    print(f"openpi_bf16 vs fp32 golden: {err:.3e}")
    assert 0 < err < 0.1  # bf16 rounding is visible, but small next to max|actions| = 4.6
