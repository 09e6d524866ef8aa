"""The backend on our Pi0.5: DuQuant folds (incl. adaRMS) are exact, W4A8 stays close to float."""

import torch
from torchao.quantization.utils import compute_error

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book

CFG = QuantVLAConfig.pi05_mlp()


def _actions(policy, obs, noise, **opts):
    torch._dynamo.reset()
    with torch.no_grad():
        fn = torch.compile(policy.sample_actions, backend="quantvla", options=CFG.replace(**opts).to_options())
        return fn(obs, noise=noise)


def test_folds_are_exact_on_pi05(golden_pi05_calibrated):
    policy, obs, noise, packs = golden_pi05_calibrated
    folded = _actions(policy, obs, noise, packs=packs, quantize=False, lowering="eager")
    notes = {n for r in report_book(None).graphs[-1].quantized for n in r.duquant}
    unfolded = _actions(policy, obs, noise, packs=packs, quantize=False, lowering="eager", duquant_fold=False)
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    assert any(n.startswith("smoothing folded into adaRMS") for n in notes), notes
    assert any(n.startswith("smoothing folded into norm weight") for n in notes), notes
    assert any("up_proj output rows" in n for n in notes), notes
    # fp32 model: the folded norm/dense parameters are rounded to fp32 once, nothing more.
    assert float((folded - unfolded).abs().max()) <= 1e-5
    assert float((folded - ref).abs().max()) <= 1e-5


def test_w4a8_actions_stay_close_to_float(golden_pi05_calibrated):
    policy, obs, noise, packs = golden_pi05_calibrated
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    sqnr = float(compute_error(ref, _actions(policy, obs, noise, packs=packs)))
    print(f"tiny Pi0.5 actions, DuQuant W4A8: SQNR {sqnr:.1f} dB vs float")
    assert sqnr >= 15
    assert len(report_book(None).graphs[-1].quantized) == 66  # (LM + 10 steps × expert) × 3 MLP linears
