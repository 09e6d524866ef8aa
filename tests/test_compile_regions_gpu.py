"""compile_regions=True on a CUDA device with CUDA graphs (skips without CUDA): each run is a
graph of the CUDA-graph tree; replays give the whole-graph result, weights and packs are read where
they live (no per-replay copy into the graph pool), and an in-place weight edit re-packs."""
import pytest
import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.testing import ToyGemma, init_toy_gemma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model_and_input():
    torch.backends.cuda.matmul.allow_tf32 = False
    m = init_toy_gemma(ToyGemma(dim=256, hidden=1024, layers=4, heads=4, head_dim=64)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, 10, 256, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    return m, x


def _replays(m, x, regions, n=4):
    torch._dynamo.reset()
    fn = torch.compile(m, backend="quantvla", options=QuantVLAConfig.all_linears(
        cudagraphs=True, compile_regions=regions, float_weights="keep").to_options())
    outs = []
    with torch.no_grad():
        for _ in range(n):  # warm-up, recording, replays
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(fn(x).clone())
    return fn, outs


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_regions_with_cudagraphs_match_the_whole_graph():
    m, x = _model_and_input()
    _, whole = _replays(m, x, False)
    _, split = _replays(m, x, True)
    assert all(_rel(s, whole[-1]) <= 2e-2 for s in split)  # int8 rounding may move where fusion differs
    assert torch.equal(split[-1], split[-2])  # replays are deterministic


@pytest.mark.parametrize("regions", [False, True])
def test_recording_does_not_copy_the_weights_into_the_pool(regions):
    # A non-static input gets a buffer of its own in the CUDA-graph pool at recording (and a copy
    # per replay). Everything this compile adds to the GPU is the packs (int4: about 0.28x the
    # bf16 weights), the activations' pool and the kernels' buffers; a copy of the weights would
    # add at least their size.
    m, x = _model_and_input()
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    fn, _ = _replays(m, x, regions, n=3)
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    assert added < 0.75 * weights, (added, weights)


def test_weight_edit_between_replays_repacks():
    m, x = _model_and_input()
    fn, before = _replays(m, x, True)
    with torch.no_grad():
        m.layers[2].mlp.up_proj.weight.mul_(-1.0)
        torch.compiler.cudagraph_mark_step_begin()
        after = fn(x).clone()
        torch.compiler.cudagraph_mark_step_begin()
        again = fn(x).clone()
    assert _rel(after, before[-1]) > 1e-3 and torch.equal(after, again)
