"""DuQuant for quantvla-fx: smoothing + block rotation + zigzag permutation + block rotation.

transform.py (the transform and its exact weight side), smooth.py, rotation.py, permutation.py
(the math), collect.py + calibrate.py (statistics and the search), packs.py (our safetensors
format, ``load_packs``), quantvla_npz.py (QuantVLA's per-layer ``.npz`` packs).
"""
from .errors import PackError
from .packs import LayerPack, Packs, load_packs
from .transform import DuQuantTransform

__all__ = ["DuQuantTransform", "LayerPack", "PackError", "Packs", "calibrate", "load_packs"]


def __getattr__(name):
    # calibrate pulls in tqdm and the hooks; load it when asked for.
    if name == "calibrate":
        from .calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'quantvla_fx.duquant' has no attribute {name!r}")
