"""Every GPU kernel behind the ops equals the reference exactly, on model-sized and odd shapes."""
import pytest
import torch

import quantvla_fx.ops  # noqa: F401
from quantvla_fx.kernels.registry import get_kernel, kernel_unavailable_reason
from quantvla_fx.models.pi05.config import Pi05Config
from quantvla_fx.quant.int4_pack import pack_int4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Toy shapes (the GPU backend test's model) and the Pi0.5 MLP GEMMs, as (N, K).
SHAPES = [(256, 256), (512, 256), (256, 512), (768, 256), *Pi05Config.pi05_libero().mlp_gemm_shapes().values()]
MS = [1, 7, 10, 50, 100, 968, 1500]


@pytest.mark.parametrize("kernel", ["triton", "bitblas"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gpu_kernel_exact(kernel, n, k):
    dev = torch.device("cuda")
    if kernel_unavailable_reason(kernel, dev):
        pytest.skip(kernel_unavailable_reason(kernel, dev))
    kern, ref = get_kernel(kernel), get_kernel("reference")
    if kern.unsupported_reason(n, k, -1, dev):
        pytest.skip(kern.unsupported_reason(n, k, -1, dev))
    g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    wp = pack_int4(torch.randint(-8, 8, (n, k), device="cuda", generator=g, dtype=torch.int8))
    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01
    for m in MS:
        x_q = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
        assert torch.equal(kern.mm(x_q, wp), ref.mm(x_q, wp)), (kernel, n, k, m)
        x_scale = torch.rand(m, 1, device="cuda", generator=g) * 0.01
        got = kern.linear(x_q, x_scale, wp, w_scale, None, torch.float32)
        want = ref.linear(x_q, x_scale, wp, w_scale, None, torch.float32)
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel <= 1e-6, (kernel, n, k, m, rel)
