"""substitute_attention: which SDPA calls become quantvla::attention, on Pi0.5 and on plain PyTorch
code, with the numbers unchanged; and what it refuses, with the reason in the report."""
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.models.pi05 import IMAGE_KEYS, Observation, Pi05
from quantvla_fx.models.pi05.masks import MASK_VALUE

GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"
pytestmark = pytest.mark.filterwarnings("ignore::quantvla_fx.QuantVLAWarning")


def _compile(fn, **cfg):
    return torch.compile(fn, backend="quantvla", options=QuantVLAConfig(**cfg).to_options())


def _attention_records():
    return report_book(None).graphs[-1].attention


@pytest.fixture(scope="module")
def golden():
    policy = Pi05.from_pretrained(GOLDEN).eval()
    obs = Observation.from_safetensors(GOLDEN / "inputs.safetensors")
    data = load_file(str(GOLDEN / "inputs.safetensors"))
    return policy, obs, data["noise"], load_file(str(GOLDEN / "expected.safetensors"))["actions"]


@pytest.mark.parametrize("quantize, lowering", [(False, "inductor"), (True, "eager")])
def test_golden_pi05_every_attention_rewritten_actions_unchanged(golden, quantize, lowering):
    policy, obs, noise, expected = golden
    with torch.no_grad():
        actions = _compile(policy.sample_actions, quantize=quantize, lowering=lowering)(obs, noise=noise)
    recs = _attention_records()
    # 1 SigLIP layer + 2 LM layers + 2 expert layers x 10 steps, all rewritten
    assert len(recs) == 23 and all(r.rewritten for r in recs), [r.reason for r in recs if not r.rewritten]
    kinds = {(r.layout, r.mask) for r in recs}
    assert kinds == {("mha", "none"), ("folded", "key + query padding"), ("folded", "key padding")}
    if not quantize:  # the attention rewrite alone: openpi's golden actions at the golden bar
        assert (actions - expected).abs().max().item() <= 1e-4


def test_attention_sdpa_switches_the_pass_off(golden):
    policy, obs, noise, expected = golden
    with torch.no_grad():
        actions = _compile(policy.sample_actions, quantize=False, attention="sdpa", lowering="eager")(obs, noise=noise)
    recs = _attention_records()
    assert len(recs) == 23 and not any(r.rewritten for r in recs)
    assert all("attention='sdpa'" in r.reason for r in recs)
    assert (actions - expected).abs().max().item() <= 1e-4


def test_pi05_masked_camera_and_different_prompt_lengths_match_eager(golden):
    """Padding in the middle of the prefix (a masked camera) and batch rows of different lengths."""
    policy, obs, noise, _ = golden
    masks = dict(obs.image_masks)
    masks[IMAGE_KEYS[1]] = torch.tensor([False, True])  # the middle camera of row 0 is masked
    prompt_mask = obs.tokenized_prompt_mask.clone()
    prompt_mask[1, 3:] = False  # row 1: a 3-token prompt
    obs2 = Observation(images=obs.images, image_masks=masks, state=obs.state, tokenized_prompt=obs.tokenized_prompt,
                       tokenized_prompt_mask=prompt_mask)
    with torch.no_grad():
        eager = policy.sample_actions(obs2, noise=noise)
        compiled = _compile(policy.sample_actions, quantize=False, lowering="eager")(obs2, noise=noise)
    assert all(r.rewritten for r in _attention_records())
    assert (compiled - eager).abs().max().item() <= 1e-4


# -- plain PyTorch modules ------------------------------------------------------------------------
B, HQ, HKV, L, D = 2, 4, 2, 9, 16


def _qkv():
    torch.manual_seed(0)
    return torch.randn(B, HQ, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)


def _key_valid():
    kv = torch.ones(B, L, dtype=torch.bool)
    kv[0, 3:5] = False  # padding in the middle
    kv[1, 6:] = False
    return kv


def gqa_masked_fill(q, k, v, key_valid):
    mask = torch.zeros(B, 1, 1, L).masked_fill(~key_valid[:, None, None, :], torch.finfo(torch.float32).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def repeat_interleave_where(q, k, v, key_valid):
    mask = torch.where(key_valid[:, None, None, :], 0.0, -1e30)
    k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)


def hf_repeat_kv_pad_outer(q, k, v, key_valid):
    def repeat_kv(x, n):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

    allowed = key_valid[:, None, :] & key_valid[:, :, None]  # padded queries see nothing
    mask = torch.where(allowed[:, None], 0.0, MASK_VALUE)
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)


def mha_no_mask(q, k, v, key_valid):
    return F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))


@pytest.mark.parametrize("fn, layout, mask", [
    (gqa_masked_fill, "enable_gqa", "key padding"),
    (repeat_interleave_where, "expanded", "key padding"),
    (hf_repeat_kv_pad_outer, "expanded", "key + query padding"),
    (mha_no_mask, "mha", "none"),
])
def test_plain_pytorch_layouts_are_rewritten(fn, layout, mask):
    q, k, v = _qkv()
    kv = _key_valid()
    with torch.no_grad():
        out = _compile(fn)(q, k, v, kv)
    rec, = _attention_records()
    assert rec.rewritten, rec.reason
    assert (rec.layout, rec.mask) == (layout, mask)
    torch.testing.assert_close(out, fn(q, k, v, kv), atol=1e-5, rtol=1e-5)


# -- refused ----------------------------------------------------------------------------------
def causal_mask(q, k, v, key_valid):
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & key_valid[:, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(allowed[:, None], 0.0, MASK_VALUE), enable_gqa=True)


def is_causal(q, k, v, key_valid):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def bool_mask(q, k, v, key_valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :], enable_gqa=True)


def neg_inf_mask(q, k, v, key_valid):
    mask = torch.zeros(B, 1, 1, L).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def fp16_overflows_mask(q, k, v, key_valid):
    mask = torch.where(key_valid[:, None, None, :], 0.0, MASK_VALUE).half().float()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def mask_is_an_input(q, k, v, key_valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid.float()[:, None, None, :], enable_gqa=True)


def heads_without_gqa(q, k, v, key_valid):
    return F.scaled_dot_product_attention(q, k[:, :1].expand(B, HQ, L, D), v[:, :1].expand(B, HQ, L, D))


@pytest.mark.parametrize("fn, why", [
    (causal_mask, "query and key position together"),
    (is_causal, "is_causal=True"),
    (bool_mask, "boolean mask"),
    (neg_inf_mask, "not an additive"),
    (fp16_overflows_mask, "becomes -inf in torch.float16"),
    (mask_is_an_input, "not an additive"),
])
def test_refused_with_the_reason(fn, why):
    q, k, v = _qkv()
    kv = _key_valid()
    with torch.no_grad():
        out = _compile(fn, lowering="eager")(q, k, v, kv)
    rec, = _attention_records()
    assert not rec.rewritten and why in rec.reason, rec.reason
    torch.testing.assert_close(out, fn(q, k, v, kv), equal_nan=True)


def test_report_md_lists_attention(tmp_path):
    q, k, v = _qkv()
    with torch.no_grad():
        _compile(gqa_masked_fill, dump_dir=str(tmp_path), lowering="eager")(q, k, v, _key_valid())
    text = (tmp_path / "report.md").read_text()
    assert "| attention (calling module) |" in text and "enable_gqa" in text and "key padding" in text


def test_config_attention_is_validated():
    from quantvla_fx import ConfigError

    with pytest.raises(ConfigError, match="attention='flashy'"):
        QuantVLAConfig(attention="flashy")


def test_no_warnings_from_the_pass_itself():
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        _compile(mha_no_mask, include=(".*",), lowering="eager")(q, k, v, _key_valid())
    assert not [x for x in w if "attention" in str(x.message)]
