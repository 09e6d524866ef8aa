"""DuQuant through the backend: exact folding, and the accuracy it buys on outlier activations."""
import pytest
import torch
from torchao.quantization.utils import compute_error

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.backend import report_book
from quantvla_fx.duquant.packs import PackError, Packs
from quantvla_fx.testing import ToyGemma, init_toy_gemma, inject_outlier_channels

CFG = QuantVLAConfig(include=(r"mlp\.",))


@pytest.fixture(scope="module")
def outlier_model_and_packs():
    torch.manual_seed(0)
    m = ToyGemma(dim=256, hidden=512, layers=2, heads=4, head_dim=64)
    m = inject_outlier_channels(init_toy_gemma(m), channels=(3, 17, 40, 200), factor=80).eval()
    batches = [torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    # alpha 0.5 is DuQuant's main.py default (0.6 in its W4A4 run.sh); clip 0.9 of the weight range.
    packs = calibrate(m, batches, CFG, block_size=64, alpha=0.5, weight_clip=0.9, progress=False, search=False)
    return m, packs


def _run(model, x, **opts):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="quantvla", options=CFG.replace(**opts).to_options())(x)


def test_folding_is_exact_in_fp64(outlier_model_and_packs):
    m, packs = outlier_model_and_packs
    m64 = m.double()
    x = torch.randn(2, 16, 256, dtype=torch.float64)
    try:
        folded = _run(m64, x, packs=packs, quantize=False, lowering="eager")
        notes = [r.duquant for r in report_book(None).graphs[-1].quantized]
        unfolded = _run(m64, x, packs=packs, quantize=False, lowering="eager", duquant_fold=False)
        ref = m64(x)
    finally:
        m.float()
    assert any("folded into norm weight" in n for ns in notes for n in ns)
    assert any("output rows" in n for ns in notes for n in ns)
    rel = float((folded - unfolded).abs().max() / unfolded.abs().max())
    assert rel <= 1e-9, rel
    assert float((folded - ref).abs().max() / ref.abs().max()) <= 1e-9


def test_duquant_beats_rtn_on_outlier_channels(outlier_model_and_packs):
    m, packs = outlier_model_and_packs
    x = torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = m(x)
    rtn = float(compute_error(ref, _run(m, x)))
    dq = float(compute_error(ref, _run(m, x, packs=packs)))
    print(f"output SQNR vs float: RTN W4A8 {rtn:.2f} dB, DuQuant W4A8 {dq:.2f} dB")
    assert dq >= rtn + 3.0


def test_duquant_packs_round_trip_through_a_file(outlier_model_and_packs, tmp_path):
    m, packs = outlier_model_and_packs
    path = packs.save(tmp_path / "packs.safetensors")
    x = torch.randn(1, 8, 256)
    a = _run(m, x, packs=packs, lowering="eager")
    b = _run(m, x, packs=str(path), lowering="eager")
    assert torch.equal(a, b)


def test_pack_with_wrong_in_features_names_layer(outlier_model_and_packs):
    m, packs = outlier_model_and_packs
    fqn = "layers.0.mlp.down_proj"
    bad = Packs({k: v for k, v in packs.items() if k != fqn} | {"layers.0.mlp.gate_proj": packs["layers.0.mlp.down_proj"]})
    with pytest.raises(Exception, match=r"layers\.0\.mlp\.(gate_proj|up_proj)"):
        _run(m, torch.randn(1, 4, 256), packs=bad, lowering="eager")


def test_packs_that_match_no_linear_warn(outlier_model_and_packs, caplog):
    m, packs = outlier_model_and_packs
    renamed = Packs([type(lp)(**{**lp.__dict__, "fqn": "model." + lp.fqn}) for lp in packs.values()])
    import logging

    with caplog.at_level(logging.WARNING, logger="quantvla_fx"):
        _run(m, torch.randn(1, 4, 256), packs=renamed, lowering="eager")
    assert "none of their 6 layers matches the 6 selected linears" in caplog.text
    assert "'model.layers.0.mlp.gate_proj'" in caplog.text


def test_packs_that_match_no_linear_are_a_python_warning(outlier_model_and_packs):
    from quantvla_fx import QuantVLAWarning

    m, packs = outlier_model_and_packs
    renamed = Packs([type(lp)(**{**lp.__dict__, "fqn": "model." + lp.fqn}) for lp in packs.values()])
    with pytest.warns(QuantVLAWarning, match="none of their 6 layers matches the 6 selected linears"):
        _run(m, torch.randn(1, 4, 256), packs=renamed, lowering="eager")
