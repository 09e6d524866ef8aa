"""The backend on a CUDA device: every kernel gives the eager-rewrite result (skips without CUDA)."""
import pytest
import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.kernels.registry import kernel_unavailable_reason
from quantvla_fx.testing import ToyGemma, init_toy_gemma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kernel", ["auto", "triton", "bitblas", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_cuda_matches_eager_rewrite(kernel, dtype):
    if kernel != "auto" and kernel_unavailable_reason(kernel, torch.device("cuda")):
        pytest.skip(kernel_unavailable_reason(kernel, torch.device("cuda")))
    torch.backends.cuda.matmul.allow_tf32 = False
    m = init_toy_gemma(ToyGemma(dim=256, hidden=512, layers=2, heads=4, head_dim=64)).cuda().to(dtype).eval()
    x = torch.randn(2, 50, 256, device="cuda", dtype=dtype)
    opts = QuantVLAConfig.all_linears(kernel=kernel).to_options()
    with torch.no_grad():
        want = torch.compile(m, backend="quantvla", options={**opts, "kernel": "reference", "lowering": "eager"})(x)
        torch._dynamo.reset()
        got = torch.compile(m, backend="quantvla", options=opts)(x)
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    # bf16: Inductor's fused norm rounds differently from eager, moving some int8 rounding boundaries.
    assert rel <= (1e-5 if dtype == torch.float32 else 3e-2), rel
