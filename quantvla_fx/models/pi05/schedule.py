"""The Euler time grid of openpi's sampler, as Python floats with float32 rounding.

openpi runs ``dt = float32(-1/N); t = float32(1); while t >= -dt/2: ...; t += dt``: the
times are float32-accumulated (1.0, 0.89999998, 0.79999995, ...), not 1 - k/N. Computing
them here in plain Python (not as tensors) keeps them exact under torch.compile: Inductor
folds chains of scalar-tensor additions in double precision, which moved the times by 1e-7
and the actions by ~5e-5. Dynamo evaluates this function at trace time, so each compiled
graph just sees constants.
"""
from __future__ import annotations

import math


def round_to_float32(x: float) -> float:
    """Nearest float32 to ``x`` (round half to even), for normal-range values."""
    if x == 0.0:
        return 0.0
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return math.ldexp(round(mantissa * 16777216.0), exponent - 24)  # 24-bit significand


def float32_euler_schedule(num_steps: int) -> tuple[float, list[float]]:
    """-> (dt, [t_0, ..., t_{num_steps-1}]) exactly as openpi's float32 tensor loop produces them."""
    dt = round_to_float32(-1.0 / num_steps)
    times = []
    t = 1.0
    while t >= -dt / 2:
        times.append(t)
        t = round_to_float32(t + dt)
    return dt, times
