"""``load_packs``: open DuQuant packs from any place a user points at (our file or QuantVLA's).

Separate from packs.py and quantvla_npz.py so that each reader knows only its own format and
neither imports the other.
"""
from __future__ import annotations

import os

from .errors import PackError
from .packs import ALL_LAYERS, Packs
from .quantvla_npz import load_quantvla_packs


def load_packs(path) -> Packs:
    """A Packs object, our ``.safetensors`` file, a directory holding one, a QuantVLA ``.npz``
    file, or a directory of QuantVLA ``.npz`` per-layer packs."""
    if isinstance(path, Packs):
        return path
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return load_quantvla_packs([path])
        return Packs.load(path)
    if not os.path.isdir(path):
        raise PackError.at(path, ALL_LAYERS, "path", "no such file or directory")
    names = sorted(os.listdir(path))
    ours = [n for n in names if n.endswith(".safetensors")]
    npz = [n for n in names if n.endswith(".npz")]
    if ours and npz:
        raise PackError.at(path, ALL_LAYERS, "path", f"holds both safetensors {ours[:2]} and .npz packs; keep one kind")
    if len(ours) > 1:
        raise PackError.at(path, ALL_LAYERS, "path", f"holds several safetensors files {ours[:4]}; pass one file")
    if ours:
        return Packs.load(os.path.join(path, ours[0]))
    if npz:
        return load_quantvla_packs([os.path.join(path, n) for n in npz], source=path)
    raise PackError.at(path, ALL_LAYERS, "path", "no .safetensors or .npz packs in this directory")
