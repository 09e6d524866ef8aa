"""DuQuant for quantvla-fx: smoothing + block rotation + zigzag permutation + block rotation.

transform.py (the transform and its exact weight side), smooth.py, rotation.py, permutation.py
(the math), collect.py + calibrate.py (statistics and the search), packs.py (our safetensors
format), quantvla_npz.py (QuantVLA's per-layer ``.npz`` packs), load.py (``load_packs``: either).
"""
from .errors import PackError
from .load import load_packs
from .packs import LayerPack, Packs
from .transform import DuQuantTransform

__all__ = ["DuQuantTransform", "LayerPack", "PackError", "Packs", "calibrate", "load_packs"]


def __getattr__(name):
    # calibrate pulls in tqdm and the hooks; load it when asked for.
    if name == "calibrate":
        from .calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'quantvla_fx.duquant' has no attribute {name!r}")
