"""Gemma building blocks of Pi05 against their formulas (openpi's patched HF Gemma)."""
import math

import pytest
import torch
import torch.nn.functional as F

from quantvla_fx.models.pi05.gemma import GemmaRMSNorm, attention, fold_mask_for_kv_groups, gated_residual
from quantvla_fx.models.pi05.masks import MASK_VALUE, additive_mask_4d, make_att_2d_masks
from quantvla_fx.models.pi05.rope import apply_rope, rope_cos_sin
from quantvla_fx.models.pi05.schedule import float32_euler_schedule, round_to_float32


def _reference_attention(q, k, v, mask, scaling):
    """HF's eager path: repeat_kv, QK^T * scale + mask, fp32 softmax, @V."""
    groups = q.shape[1] // k.shape[1]
    k = k[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
    v = v[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
    probs = torch.softmax(q @ k.transpose(2, 3) * scaling + mask, dim=-1, dtype=torch.float32)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (8, 1), (4, 2), (3, 3)])
def test_attention_matches_eager_reference_with_grouped_kv(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    b, lq, lk, d = 2, 5, 7, 8
    q = torch.randn(b, heads, lq, d, generator=g)
    k = torch.randn(b, kv_heads, lk, d, generator=g)
    v = torch.randn(b, kv_heads, lk, d, generator=g)
    allowed = torch.rand(b, lq, lk, generator=g) > 0.3
    allowed[:, :, 0] = True
    allowed[1, 2, :] = False  # a padded query row: every key masked
    mask = additive_mask_4d(allowed)
    got = attention(q, k, v, fold_mask_for_kv_groups(mask, heads // kv_heads), d ** -0.5)
    ref = _reference_attention(q, k, v, mask, d ** -0.5)
    assert got.shape == (b, lq, heads, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # openpi's finite mask: the fully masked row is the plain mean of V, not NaN
    torch.testing.assert_close(got[1, 2], v[1].mean(dim=1).repeat_interleave(heads // kv_heads, dim=0),
                               rtol=1e-5, atol=1e-5)


def test_plain_rmsnorm_scales_by_one_plus_weight_in_fp32():
    norm = GemmaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 4, 16).to(torch.bfloat16)
    y, gate = norm(x)
    xf = x.float()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    assert gate is None and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.to(torch.bfloat16), rtol=0, atol=0)


def test_adaptive_rmsnorm_scale_shift_gate():
    norm = GemmaRMSNorm(8, eps=1e-6, cond_dim=4)
    assert set(dict(norm.named_parameters())) == {"dense.weight", "dense.bias"}  # no (1+w) weight
    x, cond = torch.randn(2, 3, 8), torch.randn(2, 4)
    y, gate = norm(x, cond)
    scale, shift, ref_gate = (cond @ norm.dense.weight.T + norm.dense.bias).unsqueeze(1).chunk(3, dim=-1)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, normed * (1 + scale) + shift)
    torch.testing.assert_close(gate, ref_gate)
    torch.testing.assert_close(gated_residual(x, y, gate), x + y * gate)
    with pytest.raises(ValueError, match="adarms_cond"):
        norm(x)


def test_rope_half_split_convention():
    pos = torch.tensor([[0, 3, 7]])
    cos, sin = rope_cos_sin(pos, head_dim=4, theta=10000.0, dtype=torch.float32)
    x = torch.randn(1, 1, 3, 4)
    out = apply_rope(x, cos, sin)
    inv = torch.tensor([1.0, 10000.0 ** -0.5])
    for i, p in enumerate([0, 3, 7]):
        a = p * inv
        x1, x2 = x[0, 0, i, :2], x[0, 0, i, 2:]
        ref = torch.cat([x1 * torch.cos(a) - x2 * torch.sin(a), x2 * torch.cos(a) + x1 * torch.sin(a)])
        torch.testing.assert_close(out[0, 0, i], ref)


def test_masks_like_openpi():
    pad = torch.tensor([[True, True, False, True]])
    att = torch.tensor([[False, False, False, True]])  # token 3 starts a new (later) block
    allowed = make_att_2d_masks(pad, att)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0], expected)
    mask = additive_mask_4d(allowed)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(MASK_VALUE).item()}


def test_float32_schedule_matches_tensor_accumulation():
    for n in (1, 3, 10, 50, 100):
        dt, times = float32_euler_schedule(n)
        t, tdt, ref = torch.tensor(1.0), torch.tensor(-1.0 / n, dtype=torch.float32), []
        while t >= -tdt / 2:  # openpi's loop
            ref.append(t.item())
            t = t + tdt
        assert times == ref and dt == tdt.item() and len(times) == n
    assert round_to_float32(0.1) == torch.tensor(0.1).item()
    assert round_to_float32(1 + 2 ** -24) == 1.0  # ties round to even
    assert round_to_float32(1 + 3 * 2 ** -24) == 1 + 2 ** -22
    assert math.isclose(round_to_float32(-7.450580596923828e-08), -7.450580596923828e-08)


def test_geglu_uses_tanh_gelu():
    from quantvla_fx.models.pi05.config import GemmaConfig
    from quantvla_fx.models.pi05.gemma import GemmaMLP

    mlp = GemmaMLP(GemmaConfig(8, 1, 16, 2, 1, 4))
    x = torch.randn(3, 8)
    ref = mlp.down_proj(F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), ref, rtol=0, atol=0)
    assert not torch.allclose(mlp(x), mlp.down_proj(F.gelu(mlp.gate_proj(x)) * mlp.up_proj(x)), atol=1e-7, rtol=0)
