"""``torch.library`` custom ops: the only place where quantized GEMMs enter a graph."""
from .w4a8 import w4a8_linear, w4a8_mm

__all__ = ["w4a8_linear", "w4a8_mm"]
