"""The Triton W4A16 kernel in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must be set
before triton is imported), against the fp64 truth: per channel and per group (32, 64, 128),
split-K (2 and 3 splits, an uneven K tail), both nibble pairings (even/odd halves, interleaved), M from 1 to 33, bf16 and fp16 activations, bf16/fp16
and fp32 outputs, a bias, a strided activation view.  The interpreter runs the dot in fp32 (its
bf16 arithmetic is not exact); the bf16 tensor-core path is tested on the GPU (test_w4a16_gpu.py)."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from quantvla_fx.kernels.w4a16 import verify
    from quantvla_fx.kernels.w4a16.triton_kernel import TritonW4A16Kernel
    from quantvla_fx.kernels.w4a16.triton_launch import W4A16Tile, launch

    torch.manual_seed(0)
    kern = TritonW4A16Kernel()
    checked = 0
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k, g in [(1, 32, 64, -1), (3, 48, 128, 64), (17, 32, 96, -1), (5, 40, 256, 128), (33, 16, 64, 32)]:
            x, w, s = verify.random_problem(m, n, k, g, dtype, "cpu")
            x = torch.cat([x, x], 1)[:, ::2] if m == 3 else x  # a strided view
            bias = torch.randn(n).to(dtype)
            want = verify.truth(x, w, s, bias)
            for cfg in [None, W4A16Tile(32, 16, 32), W4A16Tile(16, 16, 16, 2), W4A16Tile(16, 32, 64, 3),
                        W4A16Tile(16, 16, 32, 2, interleave=True), W4A16Tile(32, 32, 16, 1, interleave=True)]:
                for out_dtype in (dtype, torch.float32):
                    run = kern.linear if cfg is None else (lambda *a, cfg=cfg: launch(*a, cfg))
                    why = verify.linear_error(run, x, w, s, bias, out_dtype, want)
                    assert why is None, (dtype, m, n, k, g, cfg, out_dtype, why)
                    checked += 1
    print("checked", checked)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_w4a16_kernel_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr:
        pytest.skip("this Triton's interpreter cannot run runtime loop bounds under this NumPy")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "checked 120" in proc.stdout
