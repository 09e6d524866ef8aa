"""Quantization schemes and the per-layer rules that assign them (``QuantVLAConfig.layer_schemes``).

A scheme says what a selected linear becomes, as torchao's configs do
(``Int8DynamicActivationInt4WeightConfig`` ~ ``w4a8``, ``Int4WeightOnlyConfig`` ~ ``w4a16``):

* ``w4a8``  — int4 weights (symmetric, per channel or per group) × int8 per-token activations:
  ``quantvla::w4a8_linear`` / ``w4a8_mm`` after an inserted activation quantization.
* ``w4a16`` — int4 weights only (the seeds' "W4FP16"); activations stay in the model's dtype and
  no quantization op is inserted: ``quantvla::w4a16_linear``.
* ``float`` — (rules only) keep this linear as it is.

Rules are ``(regex, scheme)`` pairs searched (``re.search``) in the calling module's FQN, like
``include``/``exclude``; a linear no rule matches gets the config's ``scheme``.  A linear that two
rules match is an error naming the layer and both rules: rules must not overlap.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from .config_checks import ConfigError

SCHEMES = ("w4a8", "w4a16")
RULE_SCHEMES = SCHEMES + ("float",)


def check_scheme(name: str, value: Any, allowed: tuple[str, ...] = SCHEMES) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name}={value!r}: choose one of {allowed}")
    return value


def check_rules(value: Any) -> tuple[tuple[str, str], ...]:
    """A dict {regex: scheme} or a sequence of (regex, scheme) pairs -> a tuple of pairs (in order)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = tuple(value.items())
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"layer_schemes={value!r}: must be a dict {{regex: scheme}} or a sequence of "
                          f"(regex, scheme) pairs, got {type(value).__name__}")
    else:
        items = tuple(value)
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"layer_schemes: {item!r} is not a (regex, scheme) pair")
        pattern, scheme = item
        check_scheme(f"layer_schemes[{pattern!r}]", scheme, RULE_SCHEMES)
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"layer_schemes regex {pattern!r} is invalid: {e}") from None
        out.append((pattern, scheme))
    patterns = [p for p, _ in out]
    dup = next((p for p in patterns if patterns.count(p) > 1), None)
    if dup is not None:
        raise ConfigError(f"layer_schemes: regex {dup!r} is given twice")
    return tuple(out)


def scheme_for(fqn: str, rules: tuple[tuple[str, str], ...], default: str) -> tuple[str, Optional[str]]:
    """(scheme, the rule that chose it or None for the default) for the linear called by ``fqn``."""
    hits = [(p, s) for p, s in rules if re.search(p, fqn)]
    if len(hits) > 1:
        shown = ", ".join(f"{p!r} -> {s}" for p, s in hits)
        raise ConfigError(f"layer_schemes: linear {fqn!r} matches {len(hits)} rules ({shown}); "
                          "make the rules disjoint so every linear has one scheme")
    if hits:
        return hits[0][1], hits[0][0]
    return default, None


def effective_group_size(k: int, group_size: int) -> int:
    """The weight group of a K-wide linear: a group as wide as K or wider is one group per row (-1)."""
    return -1 if group_size <= 0 or group_size >= k else group_size
