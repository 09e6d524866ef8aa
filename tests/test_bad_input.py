"""Bad input gets an error that names the culprit, or a logged and reported skip."""
import logging
import re

import pytest
import torch

from quantvla_fx import ConfigError, QuantVLAConfig, QuantVLAWarning
from quantvla_fx.backend import report_book

ALL = QuantVLAConfig.all_linears().to_options()


def last_report():
    return report_book(None).graphs[-1]


def test_invalid_regex_fails_at_config_creation():
    with pytest.raises(ConfigError, match=r"include regex '\(mlp' is invalid"):
        QuantVLAConfig(include=("(mlp",))
    with pytest.raises(ConfigError, match="exclude regex"):
        QuantVLAConfig(exclude=("[",))


def test_int32_epilogue_with_group_scales_is_refused():
    with pytest.raises(ConfigError, match=r"epilogue='int32' with group_size=64"):
        QuantVLAConfig(epilogue="int32", group_size=64)
    assert QuantVLAConfig(epilogue="fused", group_size=64).epilogue == "fused"
    assert QuantVLAConfig(epilogue="int32").group_size == -1


def test_unknown_option_keys_list_valid_keys():
    m = torch.nn.Linear(8, 8)
    with pytest.raises(Exception, match=r"unknown quantvla option\(s\) \['incldue'\]; valid keys: \[.*'include'"):
        torch.compile(m, backend="quantvla", options={"incldue": ".*"})(torch.randn(2, 8))


def test_include_that_matches_nothing_warns_and_reports(caplog):
    m = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with caplog.at_level(logging.WARNING, logger="quantvla_fx"):
        torch.compile(m, backend="quantvla", options={"include": ["gate_proj"]})(torch.randn(2, 16))
    assert "matched none of the 1 linears" in caplog.text
    rep = last_report()
    assert rep.notes and "matched none" in rep.notes[0]
    assert rep.linears[0].reason == "matches no include rule"


def test_nothing_quantized_is_a_python_warning_with_default_filters():
    import subprocess
    import sys

    code = ("import torch; m = torch.nn.Linear(16, 16); "
            "torch.compile(m, backend='quantvla', options={'include': ['gate_proj']})(torch.randn(2, 16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "QuantVLAWarning: quantvla: include rules ['gate_proj'] matched none of the 1 linears" in out.stderr


def test_torch_logs_shows_the_backends_info_lines():
    import os
    import subprocess
    import sys

    code = "import torch; torch.compile(torch.nn.Linear(16, 16), backend='quantvla', options={'include': ['.*']})(torch.randn(2, 16))"
    env = {**os.environ, "TORCH_LOGS": "+quantvla_fx"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quantvla: graph 0: 1 of 1 linears quantized" in out.stderr


class Odd(torch.nn.Module):
    def __init__(self, k, dtype=torch.float32):
        super().__init__()
        self.proj = torch.nn.Linear(k, 8).to(dtype)

    def forward(self, x):
        return self.proj(x)


def test_odd_k_is_skipped_with_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="quantvla_fx"):
        y = torch.compile(Odd(15), backend="quantvla", options=ALL)(torch.randn(2, 15))
    assert y.shape == (2, 8)
    rec = last_report().linears[0]
    assert not rec.quantized and "K=15 is odd" in rec.reason
    assert "proj" in caplog.text and "odd" in caplog.text


def test_all_selected_skipped_says_so_instead_of_matched_none():
    with pytest.warns(QuantVLAWarning, match=r"all 1 selected linear\(s\) were skipped, nothing is quantized \(proj: in_features K=15 is odd"):
        torch.compile(Odd(15), backend="quantvla", options=ALL)(torch.randn(2, 15))
    assert not any("matched none" in n for n in last_report().notes)


def test_k_not_multiple_of_group_size_is_skipped():
    torch.compile(Odd(48), backend="quantvla", options={**ALL, "group_size": 32})(torch.randn(2, 48))
    rec = last_report().linears[0]
    assert not rec.quantized and "K=48 is not a multiple of group_size=32" in rec.reason


def test_grouped_weights_are_quantized_when_k_divides():
    m = Odd(64)
    x = torch.randn(3, 64)
    y = torch.compile(m, backend="quantvla", options={**ALL, "group_size": 32})(x)
    assert last_report().linears[0].quantized
    assert torch.allclose(y, m(x), atol=0.1 * float(m(x).abs().max()))


def test_unsupported_weight_dtype_is_skipped():
    m = Odd(16, torch.float64)
    x = torch.randn(2, 16, dtype=torch.float64)
    y = torch.compile(m, backend="quantvla", options=ALL)(x)
    rec = last_report().linears[0]
    assert not rec.quantized and "dtype torch.float64 is not supported" in rec.reason
    assert torch.allclose(y, m(x))  # left in float, exact


def test_nan_stays_in_its_row():
    m = Odd(32).eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        clean = torch.compile(m, backend="quantvla", options={**ALL, "lowering": "eager"})(x)
        x[1, 5] = float("nan")
        torch._dynamo.reset()
        dirty = torch.compile(m, backend="quantvla", options=ALL)(x)
    assert bool(torch.isnan(dirty[1]).all())
    keep = torch.tensor([0, 2, 3])
    assert torch.allclose(dirty[keep], clean[keep], rtol=1e-5, atol=1e-6)


def test_forced_bitblas_without_cuda_is_a_clear_error():
    with pytest.raises(Exception, match=r"kernel='bitblas' was requested but cannot run on cpu: .*(bitblas|CUDA)"):
        torch.compile(Odd(32), backend="quantvla", options={**ALL, "kernel": "bitblas"})(torch.randn(2, 32))


def test_config_round_trips_through_options_and_env():
    cfg = QuantVLAConfig(include=("mlp",), group_size=64, kernel="reference", dump_dir="d")
    assert QuantVLAConfig.from_options(cfg.to_options()) == cfg
    env = {
        "OPENPI_BITBLAS_INCLUDE": r".*gemma_expert.*(gate_proj|up_proj).*",
        "OPENPI_BITBLAS_EXCLUDE": r"vision_tower",
        "OPENPI_BITBLAS_WBITS": "4",
        "OPENPI_BITBLAS_GROUP_SIZE": "128",
        "OPENPI_BITBLAS_ENABLE_TUNING": "1",
        "OPENPI_BITBLAS_OPT_M": "1,16, 32,64",
        "OPENPI_BITBLAS_DEBUG": "1",
        "OPENPI_BITBLAS_DUQUANT_PACKDIR": "/packs",
    }
    c = QuantVLAConfig.from_env(env)
    assert c.include == (env["OPENPI_BITBLAS_INCLUDE"],) and c.group_size == 128
    assert c.enable_tuning and c.debug and c.opt_m == (1, 16, 32, 64) and c.packs == "/packs"
    assert c.match("paligemma_with_expert.gemma_expert.model.layers.3.mlp.up_proj")[0]
    assert not c.match("paligemma_with_expert.gemma_expert.model.layers.3.mlp.down_proj")[0]
    with pytest.raises(ConfigError, match="OPENPI_BITBLAS_WBITS='x8' is not an integer"):
        QuantVLAConfig.from_env({"OPENPI_BITBLAS_WBITS": "x8"})
    with pytest.raises(ConfigError, match="weight_bits=8: only 4-bit"):
        QuantVLAConfig.from_env({"OPENPI_BITBLAS_WBITS": "8"})


def test_pi05_default_selection_matches_the_seeds():
    c = QuantVLAConfig.pi05_mlp()
    lm = "paligemma_with_expert.paligemma.model.language_model.layers.0"
    ex = "paligemma_with_expert.gemma_expert.model.layers.17"
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert c.match(f"{lm}.{name}")[0] and c.match(f"{ex}.{name}")[0]
    for name in (f"{lm}.self_attn.q_proj", f"{ex}.input_layernorm.dense", "action_in_proj", "time_mlp_in",
                 "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1",
                 "paligemma_with_expert.paligemma.lm_head"):
        assert not c.match(name)[0], name


def test_bitblas_tuning_switches_reach_the_kernel(monkeypatch):
    import dataclasses

    from quantvla_fx.kernel_support import parse_kernel_arg
    from quantvla_fx.kernels import select

    seen = {}
    real = select.resolve_kernel

    def spy(arg, *args):  # what the op hands to kernel selection at its call: this compile's settings
        seen.update(dataclasses.asdict(parse_kernel_arg(arg)[1]))
        return real(arg, *args)

    monkeypatch.setattr(select, "resolve_kernel", spy)
    cfg = QuantVLAConfig.from_env({"OPENPI_BITBLAS_ENABLE_TUNING": "1", "OPENPI_BITBLAS_OPT_M": "16,64"}, include=(".*",))
    torch.compile(Odd(32), backend="quantvla", options=cfg.to_options())(torch.randn(2, 32))
    assert seen == {"enable_tuning": True, "opt_m": (16, 64)}


def test_bitblas_settings_do_not_leak_into_the_next_compile(monkeypatch):
    import dataclasses

    from quantvla_fx.kernel_support import parse_kernel_arg
    from quantvla_fx.kernels import select

    seen = []
    real = select.resolve_kernel
    monkeypatch.setattr(select, "resolve_kernel", lambda arg, *a: seen.append(dataclasses.asdict(parse_kernel_arg(arg)[1])) or real(arg, *a))
    tuned = QuantVLAConfig.from_env({"OPENPI_BITBLAS_ENABLE_TUNING": "1", "OPENPI_BITBLAS_OPT_M": "16,64"}, include=(".*",))
    torch.compile(Odd(32), backend="quantvla", options=tuned.to_options())(torch.randn(2, 32))
    torch._dynamo.reset()
    torch.compile(Odd(32), backend="quantvla", options=ALL)(torch.randn(2, 32))  # model B: no settings
    assert seen[0] == {"enable_tuning": True, "opt_m": (16, 64)}
    assert seen[-1] == {"enable_tuning": False, "opt_m": ()}


@pytest.mark.parametrize("option, value, fragment", [
    ("quantize", "False", "quantize='False': must be True or False"),
    ("debug", "no", "debug='no': must be True or False"),
    ("duquant_fold", 1, "duquant_fold=1: must be True or False"),
    ("verify_weights", None, "verify_weights=None: must be True or False"),
    ("cudagraphs", "yes", "cudagraphs='yes': must be True or False"),
    ("enable_tuning", 0, "enable_tuning=0: must be True or False"),
    ("group_size", 64.0, "group_size=64.0: must be an int"),
    ("group_size", True, "group_size=True: must be an int"),
    ("weight_bits", "4", "weight_bits='4': must be an int"),
    ("opt_m", "16,32", "opt_m='16,32': must be a sequence of positive ints"),
    ("opt_m", (16, 0), "opt_m=(16, 0): must be a sequence of positive ints such as (16, 32); 0 is not"),
    ("dump_dir", 5, "dump_dir=5: must be a path"),
    ("packs", 123, "packs=123: must be None, a path to a pack file or folder, or a quantvla_fx.duquant.Packs"),
    ("inductor_options", ["max_autotune"], "inductor_options=['max_autotune']: must be a dict"),
    ("inductor_options", {"max_autotoon": True}, "'max_autotoon' is not a torch._inductor.config setting"),
    ("inductor_options", {"max_autotune": "1"}, "inductor_options['max_autotune']='1': must be bool"),
])
def test_options_are_type_checked_and_named(option, value, fragment):
    fragment = re.escape(fragment)
    with pytest.raises(ConfigError, match=fragment):
        QuantVLAConfig(**{option: value})
    with pytest.raises(Exception, match=fragment):  # the same through torch.compile's options
        torch.compile(torch.nn.Linear(8, 8), backend="quantvla", options={option: value})(torch.randn(2, 8))


def test_inductor_options_and_cudagraphs_reach_inductor(monkeypatch):
    from quantvla_fx import backend

    seen = {}
    real = backend.compile_fx
    monkeypatch.setattr(backend, "compile_fx", lambda gm, inputs, config_patches: seen.update(config_patches) or real(gm, inputs))
    opts = {**ALL, "inductor_options": {"max_autotune_gemm": False}, "cudagraphs": True}
    torch.compile(torch.nn.Linear(8, 8), backend="quantvla", options=opts)(torch.randn(2, 8))
    assert seen == {"max_autotune_gemm": False, "triton.cudagraphs": True}
