"""Importing the package on a CPU-only machine prints nothing from torchao; other records pass."""
import logging
import subprocess
import sys

import torch


def test_import_is_quiet_on_cpu():
    code = "import quantvla_fx.backend"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "Failed to load" not in out.stderr
    assert "KernelPreference" not in out.stderr


def test_only_torchaos_missing_library_lines_are_dropped():
    import quantvla_fx  # noqa: F401  (installs the filters)

    (flt,) = [f for f in logging.getLogger("torchao").filters if type(f).__name__ == "_TorchaoMissingCudaLibs"]

    def passes(msg):
        return flt.filter(logging.LogRecord("torchao", logging.WARNING, __file__, 1, msg, (), None))

    assert passes("Failed to quantize layer 3")
    assert passes("something else entirely")
    assert passes("Failed to load /x/_C_mxfp8.so: boom") == torch.cuda.is_available()
