"""calibrate() on a toy Gemma-style block with injected activation outliers."""
import pytest
import torch
from torch import nn

from quantvla_fx import QuantVLAConfig
from quantvla_fx import calibrate as lazy_calibrate
from quantvla_fx.duquant.calibrate import calibrate
from quantvla_fx.duquant.collect import _Reservoir
from quantvla_fx.quant.activations import dequantize_per_token, quantize_per_token
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4

F64 = torch.float64
D, F, K_IN, B = 128, 256, 40, 32
OUTLIERS = [5, 37, 70, 101]


class GemmaRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, F, bias=False)
        self.up_proj = nn.Linear(D, F, bias=False)
        self.down_proj = nn.Linear(F, D, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Attn(nn.Module):  # only the projections matter here: q/k/v read one input
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D, bias=False), nn.Linear(D, 32, bias=False), nn.Linear(D, 32, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q + torch.cat([k, v] * 2, dim=-1)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.self_attn = GemmaRMSNorm(D), Attn()
        self.post_attention_layernorm, self.mlp = GemmaRMSNorm(D), MLP()

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(K_IN, D)  # K=40 is not a multiple of B=32: smoothing only
        self.layers = nn.ModuleList([Layer()])

    def forward(self, x):
        h = self.in_proj(x)
        for layer in self.layers:
            h = layer(h)
        return h


def toy_model():
    torch.manual_seed(0)
    m = Toy().eval()
    with torch.no_grad():
        for lin in m.modules():  # Gaussian weights like trained ones (nn.Linear's uniform init
            if isinstance(lin, nn.Linear):  # is unusually kind to RTN and unkind to rotations)
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        # outlier channels 50-100x after both norms (Gemma's (1+w))
        for norm in (m.layers[0].input_layernorm, m.layers[0].post_attention_layernorm):
            norm.weight[OUTLIERS] = torch.tensor([49.0, 64.0, 79.0, 99.0])
    return m


def toy_batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, K_IN, generator=g) for _ in range(n)]


CFG = QuantVLAConfig(include=(r"(mlp|self_attn|in_proj)",), exclude=())
KW = dict(block_size=B, max_rotation_step=64, rotation_rows=256, progress=False, search=False)
MLP_ = "layers.0.mlp."
ATT = "layers.0.self_attn."


@pytest.fixture(scope="module")
def calibrated():
    model = toy_model()
    return model, calibrate(model, toy_batches(), CFG, **KW)


def inputs_of(model, fqn, x):
    seen = []
    h = model.get_submodule(fqn).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen[0]


def sqnr_db(ref, got):
    return 10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()).item()


def test_groups_share_one_transform_object(calibrated):
    _, packs = calibrated
    assert set(packs) == {"in_proj", *(MLP_ + n for n in ("gate_proj", "up_proj", "down_proj")),
                          *(ATT + n for n in ("q_proj", "k_proj", "v_proj"))}
    assert packs[MLP_ + "gate_proj"].transform is packs[MLP_ + "up_proj"].transform
    assert packs[MLP_ + "gate_proj"].group == MLP_ + "{gate_proj,up_proj}"
    qkv = {packs[ATT + n].transform for n in ("q_proj", "k_proj", "v_proj")}
    assert len(qkv) == 1 and packs[ATT + "k_proj"].group == ATT + "{q_proj,k_proj,v_proj}"
    assert packs[MLP_ + "down_proj"].group == MLP_ + "down_proj"
    assert packs[MLP_ + "down_proj"].transform is not packs[MLP_ + "gate_proj"].transform
    assert len(packs.groups) == 4
    t = packs[MLP_ + "gate_proj"].transform
    assert t.rot1.shape == (1, B, B) and t.rot2.shape == (1, B, B) and t.perm.shape == (D,)
    # K=40 % 32 != 0: smoothing only
    t_in = packs["in_proj"].transform
    assert t_in.smooth is not None and not t_in.has_rotation and t_in.in_features == K_IN
    assert packs.meta["alpha"] == 0.6 and packs.meta["block_size"] == B


def test_transform_reduces_activation_peak_and_quant_error(calibrated):
    model, packs = calibrated
    t = packs[MLP_ + "gate_proj"].transform
    x = inputs_of(model, MLP_ + "gate_proj", toy_batches(1, seed=7)[0]).to(F64)  # held-out batch
    xs = x / t.smooth.to(F64)
    xt = t.rotate_activation(xs)
    peak = lambda v: (v.max() - v.min()).item()  # noqa: E731 (DuQuant's objective)
    assert peak(xt) < peak(xs) / 1.5 < peak(x) / 5
    # per-block peaks: the largest block max falls relative to the typical magnitude
    blk = lambda v: (v.abs().unflatten(-1, (-1, B)).amax(-1).amax(0) / v.pow(2).mean().sqrt())  # noqa: E731
    assert blk(xt).max() < blk(xs).max() / 1.5
    # per-token int8 error, each measured in its own basis (the rotation is orthogonal)
    q = lambda v: dequantize_per_token(*quantize_per_token(v.float())).to(F64)  # noqa: E731
    assert sqnr_db(xt, q(xt)) > sqnr_db(xs, q(xs)) + 3 > sqnr_db(x, q(x)) + 6


def test_w4a8_gemm_error_drops_versus_round_to_nearest(calibrated):
    model, packs = calibrated
    fqn = MLP_ + "up_proj"
    t, w = packs[fqn].transform, model.get_submodule(fqn).weight.detach().to(F64)
    x = inputs_of(model, fqn, toy_batches(1, seed=8)[0]).to(F64)
    ref = x @ w.T
    torch.testing.assert_close(t.transform_activation(x) @ t.transform_weight(w).T, ref, rtol=1e-9, atol=1e-9)

    def w4a8(xa, wa):
        xq = dequantize_per_token(*quantize_per_token(xa.float())).to(F64)
        return xq @ dequantize_weight(*quantize_weight_int4(wa.float())).to(F64).T

    rtn, duq = sqnr_db(ref, w4a8(x, w)), sqnr_db(ref, w4a8(t.transform_activation(x), t.transform_weight(w)))
    assert duq > rtn + 3, (rtn, duq)


def test_calibration_is_deterministic_given_seed():
    a = calibrate(toy_model(), toy_batches(), CFG, **KW)
    b = calibrate(toy_model(), toy_batches(), CFG, **KW)
    c = calibrate(toy_model(), toy_batches(), CFG, **{**KW, "seed": 1})
    assert a.fingerprint() == b.fingerprint()
    ga, gc = a[MLP_ + "gate_proj"].transform, c[MLP_ + "gate_proj"].transform
    assert torch.equal(ga.smooth, gc.smooth)  # statistics do not depend on the seed...
    assert not torch.equal(ga.rot1, gc.rot1)  # ...the random part of the rotation does


def test_stats_are_exact_and_the_reservoir_samples_the_stream():
    model = toy_model()
    batches = toy_batches(3)
    cfg = QuantVLAConfig(include=(r"gate_proj",), exclude=())
    packs = calibrate(model, batches, cfg, **{**KW, "alpha": 1.0})  # alpha=1: s = act_max
    xs = torch.cat([inputs_of(model, MLP_ + "gate_proj", b) for b in batches])
    torch.testing.assert_close(packs[MLP_ + "gate_proj"].transform.smooth, xs.abs().amax(0).clamp(min=1e-2))
    assert list(packs) == [MLP_ + "gate_proj"] and packs[MLP_ + "gate_proj"].group == MLP_ + "gate_proj"

    stream = torch.arange(100.0).unsqueeze(1).repeat(1, 3)
    r = _Reservoir(10, torch.Generator().manual_seed(0))
    for chunk in stream.split(7):
        r.add(chunk)
    picked = r.rows[:, 0]
    assert r.rows.shape == (10, 3) and r.seen == 100 and len(set(picked.tolist())) == 10
    assert picked.max() >= 10  # later rows replaced some of the first ten
    r2 = _Reservoir(10, torch.Generator().manual_seed(0))
    for chunk in stream.split(7):
        r2.add(chunk)
    assert torch.equal(r.rows, r2.rows)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "run"])
def test_batch_forms_and_hooks_are_removed(form):
    model = toy_model()
    xs = toy_batches(2)
    if form == "dict":
        model.forward_dict = model.forward
        model.forward = lambda x: model.forward_dict(x)  # accept model(x=...)
    batches = {"tensor": xs, "tuple": [(x,) for x in xs], "dict": [{"x": x} for x in xs], "run": xs}[form]
    run = (lambda m, b: m(b * 1.0)) if form == "run" else None
    packs = calibrate(model, batches, CFG, **{**KW, "max_rotation_step": 2}, run=run)
    assert len(packs) == 7 and packs.meta["batches"] == 2
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_a_batch_fails():
    model = toy_model()

    def run(m, b):
        m(b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, toy_batches(2), CFG, **KW, run=run)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="selects no"):
        calibrate(toy_model(), toy_batches(1), QuantVLAConfig(include=(r"nothing_here",)), **KW)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(toy_model(), [], CFG, **KW)
    with pytest.raises(ValueError, match="weight_clip"):
        calibrate(toy_model(), toy_batches(1), CFG, **KW, weight_clip=1.5)
    with pytest.raises(ValueError, match="rotation_rows"):
        calibrate(toy_model(), toy_batches(1), CFG, **{**KW, "rotation_rows": 0})


def test_package_exposes_calibrate_and_weight_clip_is_recorded():
    assert lazy_calibrate is calibrate
    packs = calibrate(toy_model(), toy_batches(1), CFG, **{**KW, "max_rotation_step": 1}, weight_clip=0.8)
    assert {lp.weight_clip for lp in packs.values()} == {0.8}


def test_alpha_none_and_group_independence():
    fast = {**KW, "max_rotation_step": 8}
    packs = calibrate(toy_model(), toy_batches(2), CFG, **fast, alpha=None)
    t = packs[MLP_ + "gate_proj"].transform
    assert t.smooth is None and t.rot1 is not None and t.perm is not None
    # a group's transform depends on its own statistics and (seed, group name) only
    full = calibrate(toy_model(), toy_batches(2), CFG, **fast)
    mlp_only = calibrate(toy_model(), toy_batches(2), QuantVLAConfig(include=(r"mlp\.(gate|up)_proj",), exclude=()), **fast)
    assert list(mlp_only) == [MLP_ + "gate_proj", MLP_ + "up_proj"]
    assert mlp_only[MLP_ + "up_proj"].transform.fingerprint() == full[MLP_ + "up_proj"].transform.fingerprint()


def test_calibrated_packs_survive_a_file_round_trip(calibrated, tmp_path):
    from quantvla_fx.duquant import load_packs

    model, packs = calibrated
    back = load_packs(packs.save(tmp_path / "toy.safetensors"))
    assert back.fingerprint() == packs.fingerprint() and back.meta == packs.meta
    assert back[MLP_ + "gate_proj"].transform is back[MLP_ + "up_proj"].transform
    back.check_model({f: m for f, m in model.named_modules() if isinstance(m, nn.Linear)}, "toy")
