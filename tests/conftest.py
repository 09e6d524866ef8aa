import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graph of an earlier test is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def golden_pi05_calibrated():
    """openpi's tiny Pi0.5 (tests/data/pi05_tiny), its observation and noise, and DuQuant packs of
    the default MLP selection calibrated on that observation (block 32: the tiny model's widths)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from quantvla_fx import QuantVLAConfig, calibrate
    from quantvla_fx.models.pi05 import Observation, Pi05

    golden = Path(__file__).parent / "data" / "pi05_tiny"
    policy = Pi05.from_pretrained(golden).eval()
    obs = Observation.from_safetensors(golden / "inputs.safetensors")
    noise = load_file(str(golden / "inputs.safetensors"))["noise"]
    packs = calibrate(policy, [(obs,)], QuantVLAConfig.pi05_mlp(), block_size=32, progress=False, search=False,
                      run=lambda m, b: m.sample_actions(*b, noise=noise))
    return policy, obs, noise, packs
