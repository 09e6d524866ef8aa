"""``torch.library`` custom ops: the only place where quantized GEMMs and attention kernels enter a graph."""
from .attention import attention
from .w4a8 import w4a8_linear, w4a8_mm
from .w4a16 import w4a16_linear

__all__ = ["attention", "w4a16_linear", "w4a8_linear", "w4a8_mm"]
