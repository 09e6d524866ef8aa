"""float_weights on a GPU (skips without CUDA): openpi's tiny Pi0.5, every linear W4A8.

The default (``auto`` = ``offload`` on a GPU) must lower the peak memory of ``sample_actions`` by
the bytes of the freed float weights and give the very actions ``keep`` gives (same packs, same
kernels); with CUDA graphs the parameters are static inputs and nothing may read them.
"""
from pathlib import Path

import pytest
import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx import float_weights as fw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"


def _policy():
    from safetensors.torch import load_file

    from quantvla_fx.models.pi05 import Observation, Pi05

    policy = Pi05.from_pretrained(GOLDEN).eval().cuda()
    obs = Observation.from_safetensors(GOLDEN / "inputs.safetensors").to("cuda")
    noise = load_file(str(GOLDEN / "inputs.safetensors"))["noise"].cuda()
    return policy, obs, noise


def _measure(policy, obs, noise, **opts):
    """(actions, peak bytes allocated during one warm call, resident weight bytes on the GPU)."""
    torch._dynamo.reset()
    fn = torch.compile(policy.sample_actions, backend="quantvla",
                       options=QuantVLAConfig.all_linears(**opts).to_options())
    with torch.no_grad():
        for _ in range(3):  # compile, CUDA-graph warm-up and recording
            torch.compiler.cudagraph_mark_step_begin()
            fn(obs, noise=noise)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(obs, noise=noise).clone()
        torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated(), fw.resident_bytes(policy, "cuda")


def test_offload_lowers_peak_memory_and_keeps_the_actions():
    policy, obs, noise = _policy()
    with torch.no_grad():
        eager = policy.sample_actions(obs, noise=noise)
    keep, peak_keep, res_keep = _measure(policy, obs, noise, float_weights="keep")
    off, peak_off, res_off = _measure(policy, obs, noise)  # the default: auto = offload on a GPU
    # With CUDA graphs (weights freed already: this compile borrows them, the replays never read them).
    cg, _, res_cg = _measure(policy, obs, noise, cudagraphs=True)
    # An eager call brings each weight back for its layer only, from the CPU copies.
    with torch.no_grad():
        again = policy.sample_actions(obs, noise=noise)
    freed = res_keep["float"] - res_off["float"]
    print(f"tiny Pi0.5 W4A8 all linears: peak {peak_keep / 2**20:.2f} MiB (keep) -> {peak_off / 2**20:.2f} MiB "
          f"(offload); resident float {res_keep['float'] / 2**20:.2f} -> {res_off['float'] / 2**20:.2f} MiB, "
          f"derived {res_off['derived'] / 2**20:.2f} MiB; offload == keep: {torch.equal(off, keep)}; "
          f"cudagraphs rel {_rel(cg, keep):.2e}; eager again rel {_rel(again, eager):.2e}")
    assert freed > 0 and res_off["offloaded"] >= freed
    assert res_off["derived"] == res_keep["derived"]  # the same packs, not rebuilt
    assert peak_keep - peak_off >= 0.9 * freed
    assert torch.equal(off, keep)
    assert res_cg["float"] == res_off["float"] and _rel(cg, keep) <= 1e-5
    assert _rel(again, eager) <= 1e-6
    assert fw.resident_bytes(policy, "cuda")["float"] == res_off["float"]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())
