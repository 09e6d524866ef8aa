"""GPTQ int4 rounding (duquant/gptq.py): the definition on tiny matrices, RTN as its H = I case,
our weight format, and the gain it exists for."""
import pytest
import torch
from torchao.quantization.utils import compute_error

from quantvla_fx.duquant.gptq import gptq_quantize, gptq_reference
from quantvla_fx.quant.int4_pack import INT4_MAX, INT4_MIN
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4


def _hessian(x):
    return x.T.to(torch.float64) @ x.to(torch.float64)


@pytest.mark.parametrize("group_size,act_order,clip", [(-1, False, 1.0), (4, False, 0.9), (-1, True, 0.9),
                                                        (4, True, 1.0), (8, False, 0.85), (2, False, 1.0)])
def test_matches_the_closed_form_definition_on_tiny_matrices(group_size, act_order, clip):
    g = torch.Generator().manual_seed(hash((group_size, act_order, clip)) % 1000)
    w = torch.randn(5, 8, generator=g)
    x = torch.randn(64, 8, generator=g) @ torch.randn(8, 8, generator=g)  # correlated inputs
    q, s = gptq_quantize(w, _hessian(x), group_size, clip, act_order=act_order)
    q_ref, s_ref = gptq_reference(w, _hessian(x), group_size, clip, act_order=act_order)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.dtype == torch.int8 and int(q.min()) >= INT4_MIN and int(q.max()) <= INT4_MAX
    assert s.shape == ((5,) if group_size in (-1, 8) else (5, 8 // group_size)) and s.dtype == torch.float32
    # error feedback changed something: not plain RTN of the weight
    assert not torch.equal(q, quantize_weight_int4(w, group_size, clip)[0])


@pytest.mark.parametrize("group_size", [-1, 32])
def test_identity_hessian_is_round_to_nearest_exactly(group_size):
    # with uncorrelated unit inputs no error can be compensated: GPTQ is RTN, bit for bit
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    q, s = gptq_quantize(w, torch.eye(128), group_size, 1.0, damp=0.0)
    q_rtn, s_rtn = quantize_weight_int4(w, group_size)
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)


def test_dead_input_channels_are_zero_and_finite():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 16, generator=g)
    x[:, 3] = 0.0  # a channel that never fires: H has a zero row and column
    q, s = gptq_quantize(torch.randn(4, 16, generator=g), _hessian(x))
    assert torch.isfinite(s).all() and (q[:, 3] == 0).all()


@pytest.mark.parametrize("group_size", [-1, 64])
def test_gptq_beats_rtn_by_1p5_db_on_gaussian_weights(group_size):
    # Gaussian weights, correlated inputs (x = z A); H from calibration rows, SQNR on other rows
    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 256, generator=g) / 16
    a = torch.randn(256, 256, generator=g) / 16
    x_cal, x_eval = torch.randn(2048, 256, generator=g) @ a, torch.randn(1024, 256, generator=g) @ a
    y = x_eval @ w.T
    rtn = float(compute_error(y, x_eval @ dequantize_weight(*quantize_weight_int4(w, group_size)).T))
    gptq = float(compute_error(y, x_eval @ dequantize_weight(*gptq_quantize(w, _hessian(x_cal), group_size)).T))
    assert gptq >= rtn + 1.5, (rtn, gptq)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6))
    with pytest.raises(ValueError, match="multiple of group_size"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), group_size=3)
