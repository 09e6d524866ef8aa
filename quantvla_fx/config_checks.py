"""Type checks for QuantVLAConfig fields: a wrong type is an error naming the option, never coerced.

``quantize="False"`` is a non-empty string, so a truthiness test would read it as True; every
option is therefore checked for its exact type here and the error says what is accepted.
"""
from __future__ import annotations

import os
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (or variable)."""


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: must be True or False (a bool), got {type(value).__name__}")
    return value


def check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r}: must be an int, got {type(value).__name__}")
    return value


def check_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """A sequence of positive ints (a string such as "16,32" is refused: say (16, 32))."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name}={value!r}: must be a sequence of positive ints such as (16, 32), "
                          f"got {type(value).__name__}")
    items = tuple(value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name}={value!r}: must be a sequence of positive ints such as (16, 32); {v!r} is not")
    return items


def check_optional_path(name: str, value: Any):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={value!r}: must be a path (str or os.PathLike) or None, got {type(value).__name__}")
    return os.fspath(value)


def check_packs(value: Any):
    """None, a path to a pack file or folder, or a ``quantvla_fx.duquant.Packs``."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return value
    from .duquant.packs import Packs

    if not isinstance(value, Packs):
        raise ConfigError(f"packs={value!r}: must be None, a path to a pack file or folder, or a "
                          f"quantvla_fx.duquant.Packs; got {type(value).__name__}")
    return value


def check_inductor_options(value: Any) -> dict:
    """A dict of ``torch._inductor.config`` settings (checked by name and type now, not at compile)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"inductor_options={value!r}: must be a dict of torch._inductor.config settings, "
                          f"got {type(value).__name__}")
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    for key, v in value.items():
        if key not in known:
            raise ConfigError(f"inductor_options: {key!r} is not a torch._inductor.config setting")
        default = known[key]
        if default is not None and isinstance(default, (bool, int, float, str)) and type(v) is not type(default) \
                and not (type(default) is float and type(v) is int):
            raise ConfigError(f"inductor_options[{key!r}]={v!r}: must be {type(default).__name__} "
                              f"like its default {default!r}")
    return dict(value)


FLOAT_WEIGHTS = ("auto", "keep", "offload", "drop")


def check_float_weights(value: Any, quantize: bool, verify_weights: bool) -> str:
    """One of FLOAT_WEIGHTS; offload/drop cannot serve options that need the float weights in place."""
    if value not in FLOAT_WEIGHTS:
        raise ConfigError(f"float_weights={value!r}: choose one of {FLOAT_WEIGHTS}")
    if value in ("offload", "drop") and verify_weights:
        raise ConfigError(f"float_weights={value!r} with verify_weights=True: verifying reads every quantized "
                          "weight on its device at every call; use float_weights='keep' (or 'auto')")
    if value in ("offload", "drop") and not quantize:
        raise ConfigError(f"float_weights={value!r} with quantize=False: the float weights are what that check "
                          "runs on; use float_weights='keep' (or 'auto')")
    return value
