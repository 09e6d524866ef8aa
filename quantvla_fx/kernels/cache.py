"""The per-GPU disk cache: one directory rule and one atomic JSON store.

Everything a kernel learns by measuring (auto's choices, Triton's tuned tiles, BitBLAS's operator
database) lives under ``QUANTVLA_CACHE_DIR`` (default ``~/.cache/quantvla_fx``), in files named
after the GPU model, since a choice measured on one GPU says nothing about another.  A store's
file carries a stamp (format version, triton version, ...); a file with another stamp is ignored,
so a stale choice is measured again rather than trusted.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("quantvla_fx")


def cache_root() -> Path:
    """``$QUANTVLA_CACHE_DIR``, else ``~/.cache/quantvla_fx`` (read on each call: tests set it)."""
    return Path(os.environ.get("QUANTVLA_CACHE_DIR") or os.path.expanduser("~/.cache/quantvla_fx"))


def slug(name: str) -> str:
    """A GPU name as a file name: ``NVIDIA H200`` -> ``NVIDIA_H200``."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "gpu"


def device_identity(device: torch.device) -> tuple[str, str]:
    """(compute capability, model name) of a CUDA device; the device type for any other device."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{major}.{minor}", torch.cuda.get_device_name(device)
    return device.type, device.type


class JsonStore:
    """Entries of one JSON file ``{**stamp, "entries": {key: entry}}``; safe between threads.

    Loaded on first use.  ``put`` re-reads the file and merges (another process may have added
    entries), then replaces it atomically, so a reader never sees half a file.
    """

    def __init__(self, path, stamp: dict):
        self.path = Path(path)
        self.stamp = dict(stamp)
        self._lock = threading.RLock()
        self._entries: Optional[dict] = None

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("quantvla: ignoring unreadable cache %s (%s)", self.path, e)
            return {}
        stale = {k: data.get(k) for k, v in self.stamp.items() if data.get(k) != v}
        if stale:
            log.info("quantvla: cache %s was written with %s, not %s; measuring again", self.path, stale,
                     {k: self.stamp[k] for k in stale})
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def entries(self) -> dict:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries

    def get(self, key: str) -> Optional[dict]:
        return self.entries().get(key)

    def put(self, key: str, entry: dict) -> None:
        with self._lock:
            self._entries = self._read()
            self._entries[key] = entry
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump({**self.stamp, "entries": self._entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:  # a read-only cache costs a measurement next time, nothing else
                log.warning("quantvla: could not write cache %s: %s", self.path, e)
