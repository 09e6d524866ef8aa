"""W4A16 (weight-only int4): the op and its reference, the scheme config, the rewrite on toy models.

The Triton kernel's CPU-interpreter test is test_w4a16_triton_interp.py, its GPU tests
test_w4a16_gpu.py; Pi0.5 (golden tiny, the seeds' W4FP16 environment) is test_w4a16_pi05.py.
"""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torchao.quantization.utils import compute_error

import quantvla_fx.ops  # noqa: F401
from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.config_checks import ConfigError
from quantvla_fx.kernels.w4a16 import verify
from quantvla_fx.kernels.w4a16.reference import KERNEL as REFERENCE
from quantvla_fx.kernels.w4a16.select import resolve_kernel
from quantvla_fx.quant.int4_pack import unpack_int4
from quantvla_fx.quant.weights import dequantize_weight, quantize_weight_int4


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_definition(group_size, dtype):
    x, w, s = verify.random_problem(5, 24, 64, group_size, dtype, "cpu")
    bias = torch.randn(24)
    got = torch.ops.quantvla.w4a16_linear(x.view(5, 1, 64), w, s, bias, dtype, "reference")
    assert got.shape == (5, 1, 24) and got.dtype == dtype
    want = verify.truth(x, w, s, bias)
    assert verify.linear_error(REFERENCE.linear, x, w, s, bias, dtype, want) is None
    # fp32 in and out: the dequantized weight times x, exactly as F.linear computes it
    if dtype == torch.float32:
        wf = dequantize_weight(unpack_int4(w), s)
        assert torch.equal(got.view(5, 24), torch.nn.functional.linear(x, wf, bias))


def test_opcheck():
    x, w, s = verify.random_problem(3, 16, 64, 32, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.quantvla.w4a16_linear.default, (x, w, s, None, torch.float32, "reference"))
    torch.library.opcheck(torch.ops.quantvla.w4a16_linear.default, (x, w, s[:, :1].reshape(16), torch.randn(16),
                                                                   torch.float32, "auto"))


def test_bad_op_inputs_are_named():
    x, w, s = verify.random_problem(3, 16, 64, -1, torch.float32, "cpu")
    with pytest.raises(Exception, match="w4a16_linear: x has K=32 but w_packed holds K=64"):
        torch.ops.quantvla.w4a16_linear(x[:, :32], w, s, None, torch.float32)
    with pytest.raises(Exception, match="w4a16_linear: w_scale must be"):
        torch.ops.quantvla.w4a16_linear(x, w, s[:8], None, torch.float32)
    with pytest.raises(Exception, match="w4a16_linear: x must be a float tensor"):
        torch.ops.quantvla.w4a16_linear(x.to(torch.int8), w, s, None, torch.float32)


def test_cpu_and_fp32_resolve_to_the_reference():
    assert resolve_kernel("auto", "cpu", 16, 64, 3, -1, torch.bfloat16).name == "reference"
    with pytest.raises(RuntimeError, match="triton.*cannot run"):
        resolve_kernel("triton", "cpu", 16, 64, 3, -1, torch.bfloat16)


# -- config -------------------------------------------------------------------------------------
def test_scheme_config_is_checked():
    with pytest.raises(ConfigError, match=r"scheme='w4a4': choose one of \('w4a8', 'w4a16'\)"):
        QuantVLAConfig(scheme="w4a4")
    with pytest.raises(ConfigError, match="act_bits=16: weight-only int4 is scheme='w4a16'"):
        QuantVLAConfig(act_bits=16)
    with pytest.raises(ConfigError, match=r"layer_schemes\['mlp'\]='int4'"):
        QuantVLAConfig(layer_schemes={"mlp": "int4"})
    with pytest.raises(ConfigError, match="layer_schemes regex '\\(' is invalid"):
        QuantVLAConfig(layer_schemes={"(": "w4a16"})
    with pytest.raises(ConfigError, match="w4a16_group_size=7"):
        QuantVLAConfig(w4a16_group_size=7)
    cfg = QuantVLAConfig(layer_schemes=[("self_attn", "w4a16"), ("mlp", "w4a8")])
    assert QuantVLAConfig.from_options(cfg.to_options()) == cfg
    assert cfg.scheme_for("x.layers.0.self_attn.q_proj") == ("w4a16", "layer_schemes 'self_attn'")
    assert cfg.scheme_for("x.layers.0.mlp.up_proj")[0] == "w4a8" and cfg.scheme_for("lm_head") == ("w4a8", "scheme")
    assert cfg.group_size_for("w4a16", 2048) == 128 and cfg.group_size_for("w4a16", 64) == -1
    assert cfg.group_size_for("w4a8", 2048) == -1


class Block(torch.nn.Module):
    """q/k/v/o + a GeGLU MLP, with openpi-like names."""

    def __init__(self, d=128, f=256):
        super().__init__()
        self.self_attn = torch.nn.ModuleDict({n: torch.nn.Linear(d, d, bias=n == "q_proj") for n in
                                              ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(d, f, bias=False),
                                        "up_proj": torch.nn.Linear(d, f, bias=False),
                                        "down_proj": torch.nn.Linear(f, d, bias=False)})

    def forward(self, x):
        a = self.self_attn
        h = x + a["o_proj"](torch.softmax(a["q_proj"](x) @ a["k_proj"](x).transpose(-1, -2), -1) @ a["v_proj"](x))
        m = self.mlp
        return h + m["down_proj"](torch.nn.functional.gelu(m["gate_proj"](h)) * m["up_proj"](h))


def _compile(mod, x, **cfg):
    torch._dynamo.reset()
    fn = torch.compile(mod, backend="quantvla", options=QuantVLAConfig.all_linears(**cfg).to_options())
    with torch.no_grad():
        return fn(x), report_book(cfg.get("dump_dir")).graphs[-1]


def test_overlapping_rules_are_an_error_naming_layer_and_rules():
    torch.manual_seed(0)
    mod = Block().eval()
    with pytest.raises(Exception, match=r"linear 'self_attn.q_proj' matches 2 rules \('self_attn' -> w4a16, "
                                        r"'q_proj' -> float\)"):
        _compile(mod, torch.randn(2, 4, 128), layer_schemes={"self_attn": "w4a16", "q_proj": "float"})


def test_per_layer_schemes_are_applied_and_reported(tmp_path):
    torch.manual_seed(0)
    mod = Block().eval()
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        ref = mod(x)
    rules = {r"self_attn\.(q|k|o)_proj": "w4a16", r"v_proj": "float"}
    out, rep = _compile(mod, x, scheme="w4a8", layer_schemes=rules, w4a16_group_size=64, dump_dir=str(tmp_path))
    by = {r.fqn.split(".")[-1]: r for r in rep.linears}
    assert {n: (r.scheme, r.quantized, r.group_size) for n, r in by.items()} == {
        "q_proj": ("w4a16", True, 64), "k_proj": ("w4a16", True, 64), "o_proj": ("w4a16", True, 64),
        "v_proj": ("float", False, None), "gate_proj": ("w4a8", True, -1), "up_proj": ("w4a8", True, -1),
        "down_proj": ("w4a8", True, -1)}
    assert by["q_proj"].op.startswith("quantvla::w4a16_linear: one op for") and by["q_proj"].group == by["k_proj"].group
    assert "v_proj" not in (by["q_proj"].group or "")
    assert by["gate_proj"].op.startswith("quantvla::w4a8_linear")
    assert "w4a16 by layer_schemes" in by["q_proj"].reason and "float by layer_schemes" in by["v_proj"].reason
    md = (tmp_path / "report.md").read_text()
    assert "| w4a16 (g64) |" in md and "| w4a8 (per channel) |" in md
    assert float(compute_error(ref, out)) > 15


def test_w4a16_inserts_no_activation_quantization_and_matches_fake_quant():
    """The graph has no int8 tensor; the result is x · dequant(q, s)ᵀ with RTN int4 weights."""
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    x = torch.randn(3, 256)
    torch._dynamo.reset()
    fn = torch.compile(mod, backend="quantvla", options=QuantVLAConfig.all_linears(scheme="w4a16").to_options())
    with torch.no_grad():
        out, (code,) = run_and_get_code(fn, x)
        fake = mod[0].bias + x @ dequantize_weight(*quantize_weight_int4(mod[0].weight, 128)).t()
        fake = torch.nn.functional.linear(mod[1](fake), dequantize_weight(*quantize_weight_int4(mod[2].weight, 128)),
                                          mod[2].bias)
    assert "quantvla.w4a16_linear" in code and "w4a8" not in code and "int8" not in code.replace("torch.int8)", "")
    assert [(r.scheme, r.group_size) for r in report_book(None).graphs[-1].linears] == [("w4a16", 128), ("w4a16", -1)]
    assert torch.allclose(out, fake, atol=1e-5, rtol=1e-5)


def test_w4a16_weights_are_inputs_and_repack_on_edit():
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    x = torch.randn(2, 64)
    torch._dynamo.reset()
    fn = torch.compile(mod, backend="quantvla", options=QuantVLAConfig.all_linears(scheme="w4a16").to_options())
    with torch.no_grad():
        a = fn(x)
        mod[0].weight.mul_(2)
        b = fn(x)
    assert torch.allclose(b - mod[0].bias, 2 * (a - mod[0].bias), atol=1e-5)
