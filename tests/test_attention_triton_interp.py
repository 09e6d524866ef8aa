"""The Triton attention kernels in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must be
set before triton is imported), against the op's reference: split-KV with one split and with a
merge, flash, GQA, key/query padding, fully masked rows, a padded head dim (SigLIP's 72 -> 128),
a non-contiguous q. The GPU (bf16) tests are in test_attention_gpu.py."""
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
    from quantvla_fx.kernels.attention import reference, triton_flash, triton_splitkv

    torch.manual_seed(0)
    checked = 0
    for b, hq, hkv, lq, lk, d, rows in [(2, 4, 1, 5, 70, 32, False), (2, 2, 2, 33, 40, 72, True), (1, 6, 3, 3, 17, 16, True)]:
        qt = torch.randn(b, lq, hq, d)
        q = qt.transpose(1, 2)  # (B, Hq, Lq, D) as a view, as the model's q is
        k, v = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
        kv = torch.rand(b, lk) > 0.3
        kv[-1] = False  # a batch row that sees nothing: uniform
        qv = (torch.rand(b, lq) > 0.3) if rows else None
        ref = reference.attention(q, k, v, kv, qv, d ** -0.5)
        for name, run in [("splitkv", lambda: triton_splitkv.attention(q, k, v, kv, qv, d ** -0.5)),
                          ("splitkv_merge", lambda: triton_splitkv.attention(q, k, v, kv, qv, d ** -0.5, splits=3)),
                          ("flash", lambda: triton_flash.attention(q, k, v, kv, qv, d ** -0.5)),
                          ("flash_nomask", lambda: triton_flash.attention(q, k, v, None, None, d ** -0.5))]:
            exp = reference.attention(q, k, v, None, None, d ** -0.5) if name == "flash_nomask" else ref
            err = (run() - exp).abs().max().item()
            assert err < 1e-5, (name, b, hq, hkv, lq, lk, d, err)
            checked += 1
    print("checked", checked)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_attention_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr:
        pytest.skip("this Triton's interpreter cannot run runtime loop bounds under this NumPy")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "checked 12" in proc.stdout
