"""Silence torchao's import-time noise on CPU-only machines, and nothing else.

torchao tries to load its CUDA extension libraries at import and logs "Failed to load <lib>.so"
for each one that cannot load; without a GPU they never can, so the lines say nothing there.  The
filter drops exactly those records, only when torch sees no CUDA device; on a GPU machine a
failed load may be a real problem and stays visible.  torchao also registers its
``KernelPreference`` enum with torch's pytree, which torch >= 2.13 answers with a deprecation line
at every import; that one line (torchao's to fix, harmless to us) is dropped too.  Installed before
torchao is imported.
"""
from __future__ import annotations

import logging


class _TorchaoMissingCudaLibs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load ") and ".so" in msg and not _cuda_available())


class _TorchaoEnumDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("KernelPreference" in msg and "register_constant()" in msg)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def install() -> None:
    for name, kind in (("torchao", _TorchaoMissingCudaLibs), ("torch.utils._pytree", _TorchaoEnumDeprecation)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
