"""Custom ops and the reference kernel: exact integers, fp64-referenced scaling, opcheck."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantvla_fx.ops  # noqa: F401
from quantvla_fx.quant.int4_pack import pack_int4, to_twos_complement_nibbles, unpack_int4
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4


def _rand_case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    return x_q, w


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 48), k=st.integers(1, 200).map(lambda v: 2 * v))
def test_w4a8_mm_bit_exact(m, n, k):
    x_q, w = _rand_case(m, n, k, seed=m * 1000 + n)
    got = torch.ops.quantvla.w4a8_mm(x_q, pack_int4(w))
    want = (x_q.long() @ w.long().t()).to(torch.int32)  # exact integer reference
    assert got.dtype == torch.int32
    assert torch.equal(got, want)


@pytest.mark.parametrize("m,k", [(1, 2048), (7, 130), (33, 16384 + 256)])
def test_w4a8_mm_extremes_are_exact(m, k):
    # Worst case magnitudes, and K beyond the fp32-exact bound (chunked path).
    x_q = torch.full((m, k), -127, dtype=torch.int8)
    x_q[:, ::3] = 127
    w = torch.full((5, k), -8, dtype=torch.int8)
    got = torch.ops.quantvla.w4a8_mm(x_q, pack_int4(w))
    assert torch.equal(got, (x_q.long() @ w.long().t()).to(torch.int32))


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_w4a8_linear_matches_fp64_reference(group_size, bias):
    g = torch.Generator().manual_seed(1)
    m, n, k = 9, 40, 96
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    x_scale = torch.rand(m, 1, generator=g) * 0.1 + 1e-3
    q, w_scale = quantize_weight_int4(torch.randn(n, k, generator=g), group_size)
    b = torch.randn(n, generator=g) if bias else None
    got = torch.ops.quantvla.w4a8_linear(x_q, x_scale, pack_int4(q), w_scale, b, torch.float32)
    want = (x_q.double() * x_scale.double()) @ dequantize_weight(q, w_scale).double().t()
    if b is not None:
        want = want + b.double()
    rel = (got.double() - want).abs().max() / want.abs().max()
    assert rel <= 1e-5, rel


def test_opcheck_both_ops():
    x_q, w = _rand_case(5, 16, 64)
    wp = pack_int4(w)
    torch.library.opcheck(torch.ops.quantvla.w4a8_mm.default, (x_q, wp))
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.quantvla.w4a8_linear.default,
                              (x_q, torch.rand(5, 1), wp, torch.rand(16), torch.rand(16), out_dtype))
    # 3-D activations (batch, tokens, K) keep their leading dims.
    x3 = x_q.view(1, 5, 64)
    torch.library.opcheck(torch.ops.quantvla.w4a8_linear.default, (x3, torch.rand(1, 5, 1), wp, torch.rand(16), None, torch.float32))


def test_op_rejects_mismatched_k():
    x_q, w = _rand_case(2, 8, 64)
    with pytest.raises(RuntimeError, match="K=64 but w_packed holds K=62"):
        torch.ops.quantvla.w4a8_mm(x_q, pack_int4(w[:, :62]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 16), half_k=st.integers(1, 32), seed=st.integers(0, 2**16))
def test_pack_round_trip_and_layout(n, half_k, seed):
    w = torch.randint(-8, 8, (n, 2 * half_k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    p = pack_int4(w)
    assert p.shape == (n, half_k) and p.dtype == torch.int8
    assert torch.equal(unpack_int4(p), w)
    # Offset-binary, even k in the low nibble (BitBLAS's plain layout).
    u = p.view(torch.uint8).long()
    assert torch.equal(u & 0xF, w[:, 0::2].long() + 8)
    assert torch.equal(u >> 4, w[:, 1::2].long() + 8)
    # Two's-complement nibbles (TileLang) differ by XOR 0x88.
    tc = to_twos_complement_nibbles(p).view(torch.uint8).long()
    assert torch.equal(tc & 0xF, w[:, 0::2].long() & 0xF)


def test_pack_refuses_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even K"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-4, 1e4))
def test_weight_quant_bounds(seed, scale):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = quantize_weight_int4(w)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    err = (dequantize_weight(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6 * scale).all())
