"""W4A16 on the GPU: the Triton kernel against the fp64 truth at Pi0.5's MLP and attention shapes
(per channel and group 128, M from 1 to 968, bf16 and fp16, split-K), every tile candidate, the
auto choice, CUDA-graph capture, and a compiled bf16 block and the golden tiny Pi0.5 with
scheme="w4a16" against the reference kernel.  Skips without CUDA."""
import pytest
import torch
from torchao.quantization.utils import compute_error

import quantvla_fx.ops  # noqa: F401

if not torch.cuda.is_available():  # skip before importing the Triton kernels (no triton on CPU wheels)
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")
from quantvla_fx import QuantVLAConfig  # noqa: E402
from quantvla_fx.kernels.w4a16 import verify  # noqa: E402
from quantvla_fx.kernels.w4a16.reference import KERNEL as REFERENCE  # noqa: E402
from quantvla_fx.kernels.w4a16.select import DEFAULT, resolve_kernel  # noqa: E402
from quantvla_fx.kernels.w4a16.triton_kernel import KERNEL as TRITON  # noqa: E402
from quantvla_fx.kernels.w4a16.triton_launch import launch  # noqa: E402
from quantvla_fx.kernels.w4a16.triton_tiles import candidates  # noqa: E402
from quantvla_fx.models.pi05.config import Pi05Config  # noqa: E402
from quantvla_fx.testing import NormLinear  # noqa: E402

SHAPES = dict(Pi05Config.pi05_libero().mlp_gemm_shapes(), lm_q=(2048, 2048), expert_kv=(256, 1024))
DEV = torch.device("cuda")


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_matches_truth_on_pi05_shapes(name, group_size, monkeypatch):
    monkeypatch.setenv("QUANTVLA_TRITON_AUTOTUNE", "0")  # the heuristic tile; every candidate is tested below
    n, k = SHAPES[name]
    for m in (1, 10, 50, 968):
        x, w, s = verify.random_problem(m, n, k, group_size, torch.bfloat16, DEV)
        bias = torch.randn(n, device=DEV).to(torch.bfloat16)
        why = verify.linear_error(TRITON.linear, x, w, s, bias, torch.bfloat16)
        assert why is None, (name, m, group_size, why)


def test_dequant_fallback_matches_truth():
    from quantvla_fx.kernels.w4a16.dequant import KERNEL as DEQUANT

    for name in ("lm_gate_up", "expert_down"):
        n, k = SHAPES[name]
        for m in (10, 968):
            x, w, s = verify.random_problem(m, n, k, 128, torch.bfloat16, DEV)
            assert verify.linear_error(DEQUANT.linear, x, w, s, None, torch.bfloat16) is None, (name, m)


def test_fp16_and_fp32_out():
    n, k = SHAPES["expert_down"]
    for m in (3, 200):
        x, w, s = verify.random_problem(m, n, k, 128, torch.float16, DEV)
        assert verify.linear_error(TRITON.linear, x, w, s, None, torch.float16) is None
        xb = x.to(torch.bfloat16)
        assert verify.linear_error(TRITON.linear, xb, w, s, None, torch.float32) is None


@pytest.mark.parametrize("m", [10, 64, 968])
def test_every_tile_candidate_is_right(m):
    """Tuning may pick any candidate: each one is checked here (tune also checks before timing)."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for name in ("lm_down", "expert_gate_up"):
        n, k = SHAPES[name]
        for g in (-1, 128):
            x, w, s = verify.random_problem(m, n, k, g, torch.bfloat16, DEV)
            want = verify.truth(x, w, s)
            for cfg in candidates(n, k, m, g, sms):
                why = verify.linear_error(lambda *a, cfg=cfg: launch(*a, cfg), x, w, s, None, torch.bfloat16, want)
                assert why is None, (name, m, g, cfg, why)


def test_auto_picks_a_verified_kernel_and_fp32_runs_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(DEFAULT, "cache_dir", tmp_path)
    n, k = SHAPES["lm_gate_up"]
    kern = resolve_kernel("auto", DEV, n, k, 10, 128, torch.bfloat16)
    assert kern.name in ("triton", "dequant", "reference")
    assert kern.name == "triton", "at M=10 the int4 kernel should beat dequantize + fp32 matmul"
    assert resolve_kernel("auto", DEV, n, k, 10, 128, torch.float32).name == "reference"
    assert list(tmp_path.glob("auto_w4a16_*.json"))


def test_cuda_graph_capture_with_split_k():
    n, k = SHAPES["lm_down"]
    x, w, s = verify.random_problem(10, n, k, 128, torch.bfloat16, DEV)
    want = TRITON.linear(x, w, s, None, torch.bfloat16)  # tile chosen (tuned) outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = TRITON.linear(x, w, s, None, torch.bfloat16)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("group", [-1, 128])
def test_compiled_block_triton_vs_reference(group):
    torch.manual_seed(0)
    mod = NormLinear(2048, 4096).to(DEV, torch.bfloat16).eval()
    x = torch.randn(10, 2048, device=DEV, dtype=torch.bfloat16)
    outs = {}
    for kern in ("triton", "reference"):
        torch._dynamo.reset()
        cfg = QuantVLAConfig.all_linears(scheme="w4a16", w4a16_group_size=group, kernel=kern)
        with torch.no_grad():
            outs[kern] = torch.compile(mod, backend="quantvla", options=cfg.to_options())(x)
    with torch.no_grad():
        ref = mod(x)
    assert float(compute_error(outs["reference"].float(), outs["triton"].float())) > 40
    assert float(compute_error(ref.float(), outs["triton"].float())) > 15


def test_golden_tiny_pi05_w4a16_bf16_on_gpu():
    from pathlib import Path

    from safetensors.torch import load_file

    from quantvla_fx.models.pi05 import Observation, Pi05, apply_dtype_policy

    golden = Path(__file__).parent / "data" / "pi05_tiny"
    policy = apply_dtype_policy(Pi05.from_pretrained(golden).to(DEV), "openpi_bf16").eval()  # bf16 MLPs: triton
    obs = Observation.from_safetensors(golden / "inputs.safetensors").to(DEV)
    noise = load_file(str(golden / "inputs.safetensors"))["noise"].to(DEV)
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
        torch._dynamo.reset()
        cfg = QuantVLAConfig.pi05_mlp(scheme="w4a16", kernel="auto")
        fn = torch.compile(policy.sample_actions, backend="quantvla", options=cfg.to_options())
        got = fn(obs, noise=noise)
    from quantvla_fx.backend import report_book

    assert {r.kernel for r in report_book(None).graphs[-1].quantized} == {"chosen per call by auto"}
    assert float(compute_error(ref.float(), got.float())) > 20
