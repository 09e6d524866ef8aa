"""The backend on a CUDA device (skips without CUDA).

Kernels must not change results: the same compiled graph with any kernel equals it with the exact
reference kernel.  Compiled vs the eagerly run rewrite differs more on GPU than on CPU: Inductor's
fused norm and attention round differently from eager, which moves a few int8 rounding
boundaries (seen on an H200: up to 4e-3 relative in fp32 for a 2-layer toy), so that comparison
gets a looser bound.
"""
import pytest
import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.kernels.registry import kernel_unavailable_reason
from quantvla_fx.testing import ToyGemma, init_toy_gemma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model_and_input(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    m = init_toy_gemma(ToyGemma(dim=256, hidden=512, layers=2, heads=4, head_dim=64)).cuda().to(dtype).eval()
    x = torch.randn(2, 50, 256, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(0))
    return m, x


def _run(m, x, **opts):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(m, backend="quantvla", options=QuantVLAConfig.all_linears(**opts).to_options())(x)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kernel", ["auto", "triton", "bitblas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_does_not_change_the_result(kernel, dtype):
    if kernel != "auto" and kernel_unavailable_reason(kernel, torch.device("cuda")):
        pytest.skip(kernel_unavailable_reason(kernel, torch.device("cuda")))
    m, x = _model_and_input(dtype)
    want = _run(m, x, kernel="reference")
    got = _run(m, x, kernel=kernel)
    # Exact int32 products; only the epilogue's multiplication order (and bf16 output rounding) differs.
    assert _rel(got, want) <= (1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_close_to_eager_rewrite(dtype):
    m, x = _model_and_input(dtype)
    eager = _run(m, x, kernel="reference", lowering="eager")
    compiled = _run(m, x)
    assert _rel(compiled, eager) <= (1e-2 if dtype == torch.float32 else 3e-2)



def _up_proj(model):
    return next(mod for name, mod in model.named_modules() if name.endswith("mlp.up_proj"))



@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_cudagraphs_replay_reads_the_live_packs(kernel):
    """cudagraphs=True: replays match the graph without CUDA graphs, and an in-place weight edit
    between replays re-packs (a new pack address), so the CUDA graph re-records instead of
    replaying the old pack.  The CUDA-graph compile runs first, so buffers a kernel keeps
    (split-K counters) are first allocated under the graph trees' warm-up."""
    import copy

    if kernel != "auto" and kernel_unavailable_reason(kernel, torch.device("cuda")):
        pytest.skip(kernel_unavailable_reason(kernel, torch.device("cuda")))
    m, x = _model_and_input(torch.float32)
    m2 = copy.deepcopy(m)
    torch._dynamo.reset()
    fn = torch.compile(m, backend="quantvla",
                       options=QuantVLAConfig.all_linears(kernel=kernel, cudagraphs=True,
                                                          float_weights="keep").to_options())  # edited on the GPU
    with torch.no_grad():
        for _ in range(3):  # warm-up, recording, replay
            torch.compiler.cudagraph_mark_step_begin()
            first = fn(x).clone()
        _up_proj(m).weight.mul_(-1.0)
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            edited = fn(x).clone()
    want = _run(m2, x, kernel=kernel, float_weights="keep")
    with torch.no_grad():
        _up_proj(m2).weight.mul_(-1.0)
    want_edited = _run(m2, x, kernel=kernel)
    assert _rel(first, want) <= 1e-6
    assert _rel(edited, want_edited) <= 1e-6 and _rel(edited, want) > 1e-3


def test_split_k_counters_stay_out_of_cudagraph_pools():
    """The split-K counters live as long as the process, so they must not land in the pool of a
    CUDA-graph tree warming up (it refuses to record while a tensor it does not own lives there:
    the full Pi0.5 W4A8 compile failed so).  Torch routes every allocation of the warming-up
    thread into the pool, whatever the stream."""
    pytest.importorskip("triton")
    from torch._inductor.cudagraph_trees import _use_cuda_memory_pool_manager

    from quantvla_fx.kernels.triton.launch import _zeros_outside_graph_pools

    dev = torch.device("cuda", torch.cuda.current_device())
    pool = torch.cuda.graph_pool_handle()
    with _use_cuda_memory_pool_manager(dev.index, pool, torch.cuda.Stream(dev)):
        inside = torch.empty(1 << 20, device=dev)
        counters = _zeros_outside_graph_pools(4096, dev)

    def pool_of(t):
        for seg in torch.cuda.memory_snapshot():
            if seg["address"] <= t.data_ptr() < seg["address"] + seg["total_size"]:
                return tuple(seg["segment_pool_id"])
        raise AssertionError("tensor not found in the allocator's segments")

    assert pool_of(inside) == tuple(pool)  # the check itself sees the pool
    assert pool_of(counters) != tuple(pool)
    assert int(counters.abs().sum()) == 0
