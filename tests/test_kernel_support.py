"""kernel_support: the pure capability rules the passes ask, and the op's kernel argument."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.kernel_support import (AUTO_REPORT, KernelSettings, cannot_run, device_reason, kernel_arg,
                                        parse_kernel_arg, report_name, shape_reason)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.mark.parametrize("kw, arg", [
    ({}, "auto"),
    ({"kernel": "reference", "enable_tuning": True, "opt_m": (16,)}, "reference"),  # settings are BitBLAS's only
    ({"kernel": "bitblas", "opt_m": (64, 16, 16)}, "bitblas|opt_m=16,64"),
    ({"enable_tuning": True, "opt_m": (32,)}, "auto|enable_tuning=1|opt_m=32"),
])
def test_kernel_arg_round_trips(kw, arg):
    cfg = QuantVLAConfig(**kw)
    assert kernel_arg(cfg) == arg
    name, settings = parse_kernel_arg(arg)
    assert name == cfg.kernel
    if name in ("auto", "bitblas"):
        assert settings == KernelSettings.of(cfg)


def test_bad_kernel_arg_is_refused():
    with pytest.raises(ValueError, match="unknown setting 'tuning'"):
        parse_kernel_arg("bitblas|tuning=1")
    with pytest.raises(ValueError, match="must be positive"):
        KernelSettings(opt_m=(0, 16))


def test_report_names_the_forced_kernel_or_auto_rule():
    assert report_name("triton", CPU) == "triton"
    assert report_name("auto|enable_tuning=1", CPU) == "reference"
    assert report_name("auto", torch.device("cuda")) == AUTO_REPORT


def test_rules_without_a_gpu():
    assert device_reason("reference", CPU) is None and device_reason("auto", CPU) is None
    assert "CUDA device" in device_reason("bitblas", CPU)
    assert "unknown quantvla kernel 'cutlass'" in device_reason("cutlass", CPU)
    assert shape_reason("bitblas", 40, 64, -1) == "N=40 is not a multiple of 16, which BitBLAS's kernel tiles need."
    assert shape_reason("triton", 64, 256, 256) is None and "per-group" in shape_reason("triton", 64, 256, 128)
    assert cannot_run("reference", 3, 6, 2, CPU) is None


def test_importing_it_loads_no_kernel():
    code = ("import sys, quantvla_fx.kernel_support, quantvla_fx.passes.match_linears; "
            "print(sorted(m for m in sys.modules if m.startswith('quantvla_fx.kernels') or m in ('bitblas', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_pass_imports_the_kernels():
    for path in sorted((REPO / "passes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert "kernels" not in name.split("."), f"{path.name} imports {name}"
