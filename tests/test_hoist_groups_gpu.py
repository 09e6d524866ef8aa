"""On a GPU: tiny Pi0.5 through Inductor with the hoist and one-op groups (skipped without CUDA)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"


def test_tiny_pi05_on_cuda_float_matches_openpi_and_w4a8_matches_its_eager_rewrite():
    from quantvla_fx.models.pi05 import Observation, Pi05

    policy = Pi05.from_pretrained(GOLDEN, device="cuda").eval()
    obs = Observation.from_safetensors(GOLDEN / "inputs.safetensors").to("cuda")
    noise = load_file(str(GOLDEN / "inputs.safetensors"))["noise"].cuda()
    expected = load_file(str(GOLDEN / "expected.safetensors"))["actions"].cuda()

    def run(**opts):
        torch._dynamo.reset()
        fn = torch.compile(policy.sample_actions, backend="quantvla", fullgraph=True,
                           options=QuantVLAConfig.all_linears(**opts).to_options())
        with torch.no_grad():
            return fn(obs, noise=noise)

    floats = run(quantize=False)
    assert report_book(None).graphs[-1].hoisted  # the time path left the graph
    assert float((floats - expected).abs().max()) <= 1e-3  # TF32-free fp32, Inductor vs openpi
    w4a8 = run()
    eager = run(lowering="eager")
    assert float((w4a8 - eager).abs().max() / eager.abs().max()) <= 1e-3
