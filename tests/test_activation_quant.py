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
