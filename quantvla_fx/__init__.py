"""quantvla-fx: a torch.compile backend for W4A8 (int4 weights, int8 activations) VLA policies.

``torch.compile(policy, backend="quantvla")`` resolves through the ``torch_dynamo_backends``
entry point; importing this package is not required.
"""
import logging

from . import import_noise

import_noise.install()  # before anything below imports torchao

from .config import ConfigError, QuantVLAConfig
from .derived_inputs import refresh
from .report import QuantVLAWarning

logging.getLogger("quantvla_fx").addHandler(logging.NullHandler())

__all__ = ["ConfigError", "QuantVLAConfig", "QuantVLAWarning", "calibrate", "refresh"]
__version__ = "0.1.0"


def __getattr__(name):
    # DuQuant calibration pulls in more code; load it only when asked for.
    if name == "calibrate":
        from .duquant.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'quantvla_fx' has no attribute {name!r}")
