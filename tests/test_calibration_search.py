"""The sequential calibration search (duquant/search.py, candidates.py) and stored GPTQ rounding."""
import warnings

import pytest
import torch
from torch import nn
from torchao.quantization.utils import compute_error

from quantvla_fx import QuantVLAConfig
from quantvla_fx.duquant.calibrate import calibrate
from quantvla_fx.duquant.candidates import SearchGrid
from quantvla_fx.duquant.packs import Packs
from quantvla_fx.duquant.search import FakeQuant
from quantvla_fx.quant.weights import dequantize_weight
from quantvla_fx.report import QuantVLAWarning
from quantvla_fx.testing import GemmaRMSNorm, ToyGeGLU

CFG = QuantVLAConfig(include=(r"mlp\.",))
OUTLIERS = (3, 50, 111, 200)


class Layer(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.post_attention_layernorm, self.mlp = GemmaRMSNorm(d), ToyGeGLU(d, f)

    def forward(self, x):
        return x + self.mlp(self.post_attention_layernorm(x))


class MLPStack(nn.Module):
    """Gemma-style MLP blocks; nn.Linear's own (kaiming-uniform) init; norms with outlier channels."""

    def __init__(self, d, f, n=2, outliers=OUTLIERS, factor=60.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Layer(d, f) for _ in range(n))
        with torch.no_grad():
            for layer in self.layers:
                layer.post_attention_layernorm.weight[list(outliers)] = factor - 1.0  # (1 + w) = factor

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def batches(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def compiled_sqnr(model, cfg, x):
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="quantvla", options=cfg.to_options())(x)
    return float(compute_error(ref, out))


SMALL_GRID = SearchGrid(alphas=(0.4, 0.6), block_sizes=(16, 32), clips=(1.0, 0.9), rotate_alphas=1, gptq_top=1)
SMALL_KW = {"search": True, "grid": SMALL_GRID, "max_rotation_step": 32, "rotation_rows": 128, "progress": False}


def small_model():
    return MLPStack(64, 128, n=2, outliers=(3, 17, 40, 60)).eval()


@pytest.fixture(scope="module")
def small_gptq():
    m = small_model()
    return m, calibrate(m, batches(3, (2, 16, 64), 1), CFG, weight_rounding="gptq", **SMALL_KW)


SLOW = pytest.mark.skipif(not __import__("os").environ.get("QUANTVLA_SLOW"),
                          reason="tens of seconds to minutes on 2 CPU cores; set QUANTVLA_SLOW=1")


@pytest.mark.slow
@SLOW
def test_toy_search_beats_rtn_by_3db_through_the_backend():
    # The bar: d=256, ffn=1024, 2 layers, 4 norm channels x60, 8 batches of 2x32 tokens,
    # evaluated on other inputs. Default grid; RTN rounding (the search alone).
    model = MLPStack(256, 1024).eval()
    packs = calibrate(model, batches(8, (2, 32, 256), 1), CFG, search=True, progress=False)
    x = batches(1, (4, 32, 256), 2)[0]
    rtn, searched = compiled_sqnr(model, CFG, x), compiled_sqnr(model, CFG.replace(packs=packs), x)
    assert searched >= rtn + 3.0, (rtn, searched)


def test_search_never_chooses_worse_than_rtn_and_records_every_candidate(small_gptq):
    _, packs = small_gptq
    assert len(packs.groups) == 4
    for group in packs.groups:
        rec = packs[packs.members(group)[0]].search
        scores = rec["candidates"]
        rtn = scores["rtn clip=1 rtn"]
        assert rec["rtn_db"] == rtn and rec["score_db"] == max(scores.values()) >= rtn
        assert scores[rec["chosen"]] == rec["score_db"]
        kinds = {name.split()[0] for name in scores}
        assert kinds == {"rtn", "smooth", "rotate", "duquant"}, kinds
        assert any(name.endswith(" gptq") for name in scores)
    assert set(packs.meta["gain_db"]) == set(packs.groups)


def test_rtn_wins_when_nothing_beats_it():
    # Without outliers nor correlations transforms rarely help; whatever wins, ties and losses go to RTN.
    m = MLPStack(64, 128, n=1, outliers=(), seed=3).eval()
    packs = calibrate(m, batches(2, (2, 16, 64), 4), CFG, **SMALL_KW)
    for group in packs.groups:
        rec = packs[packs.members(group)[0]].search
        assert rec["score_db"] >= rec["rtn_db"]
        if rec["chosen"].startswith("rtn clip=1 "):
            t = packs.groups[group]
            assert t.smooth is None and not t.has_rotation


def test_search_is_deterministic():
    a = calibrate(small_model(), batches(2, (2, 16, 64), 1), CFG, **SMALL_KW)
    b = calibrate(small_model(), batches(2, (2, 16, 64), 1), CFG, **SMALL_KW)
    assert a.fingerprint() == b.fingerprint()
    assert [a[f].search for f in a] == [b[f].search for f in b]


def test_fake_quant_simulates_what_the_backend_runs(small_gptq):
    # The search scores later groups on the model with earlier groups fake-quantized: that
    # simulation must be what the compiled backend computes (stored GPTQ values included).
    model, packs = small_gptq
    x = batches(1, (2, 16, 64), 9)[0]
    hooks = []
    from quantvla_fx.quant.int4_pack import unpack_int4
    for fqn, lp in packs.items():
        lin = model.get_submodule(fqn)
        t = lp.transform if (lp.transform.smooth is not None or lp.transform.has_rotation) else None
        assert lp.rounding is not None or not lp.search["chosen"].endswith("gptq")
        if lp.rounding is not None:
            w = dequantize_weight(unpack_int4(lp.rounding.packed), lp.rounding.scale)
        else:
            from quantvla_fx.quant.weights import quantize_weight_int4
            wt = t.transform_weight(lin.weight).float() if t is not None else lin.weight.detach().float()
            w = dequantize_weight(*quantize_weight_int4(wt, -1, lp.weight_clip))
        hooks.append(lin.register_forward_hook(FakeQuant(t, w, lin.bias), with_kwargs=True))
    try:
        with torch.no_grad():
            simulated = model(x)
    finally:
        for h in hooks:
            h.remove()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="quantvla", options=CFG.replace(packs=packs).to_options())(x)
    assert float(compute_error(simulated, compiled)) > 45


def test_gptq_packs_round_trip_and_old_packs_still_load(small_gptq, tmp_path):
    _, packs = small_gptq
    assert any(lp.rounding is not None for lp in packs.values())
    path = packs.save(tmp_path / "p.safetensors")
    back = Packs.load(path)
    assert back.fingerprint() == packs.fingerprint()
    for fqn, lp in packs.items():
        assert back[fqn].search == lp.search
        if lp.rounding is not None:
            r = back[fqn].rounding
            assert torch.equal(r.packed, lp.rounding.packed) and torch.equal(r.scale, lp.rounding.scale)
            assert r.weight_digest == lp.rounding.weight_digest and r.group_size == -1
    # a version-1 file (no rounding, no search record) is still read
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if not k.endswith(("int4", "int4_scale"))}  # noqa: SIM118 (safe_open is not iterable)
    import json
    layers = {k: {kk: vv for kk, vv in v.items() if kk != "rounding"} for k, v in json.loads(meta["layers"]).items()}
    groups = {k: {kk: vv for kk, vv in v.items() if kk != "search"} for k, v in json.loads(meta["groups"]).items()}
    save_file(tensors, tmp_path / "v1.safetensors",
              metadata={**meta, "format_version": "1", "layers": json.dumps(layers), "groups": json.dumps(groups)})
    v1 = Packs.load(tmp_path / "v1.safetensors")
    assert all(lp.rounding is None and lp.search is None for lp in v1.values())


def test_stored_gptq_values_are_used_and_a_changed_weight_falls_back_with_a_warning(small_gptq):
    model, packs = small_gptq
    fqn = next(f for f, lp in packs.items() if lp.rounding is not None)
    x = batches(1, (2, 16, 64), 5)[0]
    cfg = CFG.replace(packs=packs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantVLAWarning)  # the weights are those of the calibration
        gptq = compiled_sqnr(model, cfg, x)
    # without the stored values (same transforms, RTN rounding) the backend computes something else
    rtn_only = Packs([type(lp)(fqn=lp.fqn, transform=lp.transform, group=lp.group, weight_clip=lp.weight_clip)
                      for lp in packs.values()], meta=packs.meta)
    assert gptq != compiled_sqnr(model, CFG.replace(packs=rtn_only), x)
    lin = model.get_submodule(fqn)
    old = lin.weight.detach().clone()
    try:
        with torch.no_grad():
            lin.weight.mul_(1.001)
        with pytest.warns(QuantVLAWarning, match=rf"{fqn}: gptq rounding not used \(weights changed since "
                                                 r"calibration: re-calibrate\)"):
            compiled_sqnr(model, cfg, x)
    finally:
        with torch.no_grad():
            lin.weight.copy_(old)


def test_group_size_mismatch_falls_back_with_a_warning(small_gptq):
    model, packs = small_gptq
    with pytest.warns(QuantVLAWarning, match="for group_size -1, this compile uses 32"):
        compiled_sqnr(model, CFG.replace(packs=packs, group_size=32), batches(1, (2, 16, 64), 5)[0])


def test_bad_arguments_name_the_problem():
    m = small_model()
    with pytest.raises(ValueError, match="weight_rounding"):
        calibrate(m, batches(1, (1, 4, 64), 1), CFG, search=True, weight_rounding="nearest", progress=False)
    with pytest.raises(ValueError, match="needs search=True"):
        calibrate(m, batches(1, (1, 4, 64), 1), CFG, weight_rounding="gptq", search=False, progress=False)
    with pytest.raises(ValueError, match="clip"):
        SearchGrid(clips=(1.2,))


@pytest.mark.slow
@SLOW
def test_golden_tiny_pi05_search_with_gptq_beats_rtn_by_3db():
    # The bar: calibration on jittered observations, evaluated on another jitter.
    from pathlib import Path

    from safetensors.torch import load_file

    from quantvla_fx.models.pi05 import Observation, Pi05
    from quantvla_fx.models.pi05.observation import jittered

    golden = Path(__file__).parent / "data" / "pi05_tiny"
    policy = Pi05.from_pretrained(golden).eval()
    obs = Observation.from_safetensors(golden / "inputs.safetensors")
    noise = load_file(str(golden / "inputs.safetensors"))["noise"]

    cfg = QuantVLAConfig.pi05_mlp()
    packs = calibrate(policy, [(jittered(obs, s),) for s in range(4)], cfg, run=lambda m, b: m.sample_actions(*b, noise=noise),
                      block_size=32, search=True, weight_rounding="gptq", progress=False)
    held_out = jittered(obs, 1000)

    def sqnr(c):
        torch._dynamo.reset()
        with torch.no_grad():
            ref = policy.sample_actions(held_out, noise=noise)
            return float(compute_error(ref, torch.compile(policy.sample_actions, backend="quantvla",
                                                          options=c.to_options())(held_out, noise=noise)))

    rtn, searched = sqnr(cfg), sqnr(cfg.replace(packs=packs))
    assert searched >= rtn + 3.0, (rtn, searched)
