"""Warm start: save the compile caches of this process to one file, load them in a new process.

    import quantvla_fx.compile_cache as compile_cache
    compiled(observation, noise=noise)           # first call: the compile fills PyTorch's caches
    compile_cache.save("pi05.cache")             # Inductor, Triton, AOTAutograd, autotuning entries
    ...                                          # a new process, same machine type and versions:
    compile_cache.load("pi05.cache")             # before the first compile
    compiled(observation, noise=noise)           # the compile hits the FX graph and AOTAutograd caches

A thin wrapper around PyTorch's Mega-Cache (``torch.compiler.save_cache_artifacts()`` /
``load_cache_artifacts()``). It works for quantvla graphs because they are cacheable: weights
and everything derived from them (packs, folded norms, hoisted values) are graph inputs, never
constants, and the custom ops are ``torch.library`` ops, so the cache key holds no tensor value.
What a warm start still does: Dynamo's trace, our rewrite (and packing from the live weights, so
a changed checkpoint is always seen) and loading the cached code; Inductor's codegen and the
C++/Triton compiles are skipped. Kernel choices of ``kernel="auto"`` live in quantvla's own
cache (``QUANTVLA_CACHE_DIR``), not in this file.

The file is only valid for the same torch version, device type and Inductor configuration; PyTorch
checks this itself and misses (recompiles) otherwise. It holds compiled code: load only files
you made.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

import torch

log = logging.getLogger("quantvla_fx")

MAGIC = b"quantvla-compile-cache-v1\n"


class CompileCacheError(RuntimeError):
    """A cache file that cannot be read or written; the message names the file."""


def save(path: str | os.PathLike) -> Optional["torch.compiler.CacheInfo"]:
    """Write every cache artifact this process produced or loaded to ``path``.

    Returns PyTorch's ``CacheInfo`` (which artifacts went in), or None when there was nothing to
    save (no compile ran since the process started, or every compile missed all caches' recording).
    The file is replaced atomically.
    """
    path = os.fspath(path)
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        log.warning("quantvla: compile_cache.save(%r): no compile cache artifacts in this process; nothing written", path)
        return None
    data, info = result
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".compile_cache_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise CompileCacheError(f"quantvla: cannot write compile cache {path}: {e}") from e
    log.info("quantvla: compile cache saved to %s (%d bytes: %s)", path, len(data) + len(MAGIC), _describe(info))
    return info


def load(path: str | os.PathLike) -> Optional["torch.compiler.CacheInfo"]:
    """Load a file written by :func:`save` into PyTorch's caches; call it before the first compile.

    Returns the ``CacheInfo`` of what was loaded (None: PyTorch loaded nothing from it).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CompileCacheError(f"quantvla: cannot read compile cache {path}: {e}") from e
    if not data.startswith(MAGIC):
        raise CompileCacheError(f"quantvla: {path} is not a compile cache written by quantvla_fx.compile_cache.save")
    try:
        info = torch.compiler.load_cache_artifacts(data[len(MAGIC):])
    except Exception as e:  # noqa: BLE001 (a truncated or foreign payload: say which file)
        raise CompileCacheError(f"quantvla: compile cache {path} could not be loaded "
                                f"({type(e).__name__}: {e}); delete it and compile cold") from e
    log.info("quantvla: compile cache loaded from %s (%s)", path, _describe(info))
    return info


def _describe(info) -> str:
    if info is None:
        return "nothing"
    counts = {k: len(v) for k, v in getattr(info, "artifacts", {}).items() if v}
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "no artifacts"
