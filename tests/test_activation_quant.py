"""Per-token int8 activation quantization: bounds, zero rows, NaN confinement."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantvla_fx.quant.activations import dequantize_per_token, quantize_per_token


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), mag=st.floats(1e-6, 1e6), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_bounds_and_error(seed, mag, dtype):
    x = (torch.randn(6, 48, generator=torch.Generator().manual_seed(seed)) * mag).to(dtype)
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6, 1)
    assert int(q.abs().max()) <= 127
    err = (dequantize_per_token(q, s) - x.float()).abs()
    assert bool((err <= s / 2 * (1 + 1e-5)).all())


def test_zero_row_gives_zeros_not_nan():
    q, s = quantize_per_token(torch.zeros(2, 16))
    assert torch.equal(q, torch.zeros_like(q)) and bool(torch.isfinite(s).all())


def test_non_finite_rows_give_nan_scales_and_other_rows_are_untouched():
    x = torch.randn(4, 16)
    x[1, 3], x[2, 5], x[3, 0] = float("inf"), float("-inf"), float("nan")
    q, s = quantize_per_token(x)
    assert bool(torch.isnan(s[1:]).all()) and bool(torch.isfinite(s[0]).all())
    q0, s0 = quantize_per_token(x[:1])
    assert torch.equal(q[:1], q0) and torch.equal(s[:1], s0)


def test_inf_activation_through_the_backend_is_non_finite_where_float_is():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval()
    x = torch.randn(3, 16)
    x[1, 2] = float("inf")
    from quantvla_fx import QuantVLAConfig

    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="quantvla", options=QuantVLAConfig.all_linears().to_options())(x)
    assert not bool(torch.isfinite(want[1]).any()) and bool(torch.isnan(got[1]).all())
    assert bool(torch.isfinite(got[[0, 2]]).all())
