"""Plain-PyTorch Pi0.5 (openpi's PI0Pytorch with pi05=True), module names equal to openpi's."""
from .checkpoint import CheckpointError, save_pi05
from .config import GEMMA_VARIANTS, GemmaConfig, Pi05Config, Pi05ConfigError, VisionConfig
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
    "Pi05ConfigError",
    "VisionConfig",
    "apply_dtype_policy",
    "save_pi05",
]
