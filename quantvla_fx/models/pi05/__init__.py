"""Plain-PyTorch Pi0.5 (openpi's PI0Pytorch with pi05=True), module names equal to openpi's."""
from .checkpoint import CheckpointError, load_pi05, save_pi05
from .config import GEMMA_VARIANTS, GemmaConfig, Pi05Config, VisionConfig
from .dtype_policy import DTYPE_POLICIES, apply_dtype_policy
from .model import Pi05
from .observation import IMAGE_KEYS, Observation

__all__ = [
    "CheckpointError",
    "DTYPE_POLICIES",
    "GEMMA_VARIANTS",
    "GemmaConfig",
    "IMAGE_KEYS",
    "Observation",
    "Pi05",
    "Pi05Config",
    "VisionConfig",
    "apply_dtype_policy",
    "load_pi05",
    "save_pi05",
]
