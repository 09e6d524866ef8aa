"""What each attention kernel can run, from shape and device rules alone (nothing is imported or built).

``quantvla::attention`` carries the user's choice (``QuantVLAConfig.attention``) as a string; the
kernel is picked behind the op (``kernels/attention/select.py``) from these rules.  Config, the
``substitute_attention`` pass (for the report) and the kernels all read them from here.

Semantics shared by every kernel (openpi's finite additive mask): key j is visible to query i of
batch b iff ``key_valid[b, j] and query_valid[b, i]`` (a missing description means all valid);
a query row that sees no key gets a uniform softmax over all Lk keys, as SDPA computes with a
finite mask value (``MASK_VALUE``) added to every logit of the row.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

# "sdpa" switches the substitute_attention pass off; the others are the op's kernel choice.
ATTENTION_CHOICES = ("auto", "sdpa", "reference", "splitkv", "flash")
ATTENTION_KERNELS = ("reference", "splitkv", "flash")
# openpi's additive mask value (models/pi05/masks.py); the kernels replace masked logits by it.
MASK_VALUE = -2.3819763e38
# A finite additive mask value at or below this is treated as "masked" (exp underflows to 0 in
# fp32 and a row of only masked logits is uniform unless |logit| > ~1e22).
MASKED_AT_MOST = -1e30
SPLITKV_MAX_QUERIES = 64  # per KV head and query head: the expert (10 or 50 action tokens)
MAX_HEAD_DIM = 256
GPU_DTYPES = (torch.bfloat16, torch.float16)


def auto_choice(device: torch.device, dtype: torch.dtype, lq: int, d: int) -> str:
    """The kernel ``auto`` runs: reference on CPU, fp32 or shapes the Triton kernels do not take."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in GPU_DTYPES or triton_reason(device) or d > MAX_HEAD_DIM:
        return "reference"
    return "splitkv" if lq <= SPLITKV_MAX_QUERIES else "flash"


def triton_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install quantvla-fx[gpu])"
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"the triton attention kernels need a CUDA device, got {device}"
    return None


def cannot_run(name: str, device, dtype: torch.dtype, d: int) -> Optional[str]:
    """None if kernel ``name`` runs this attention on ``device``, else why not."""
    if name == "reference":
        return None
    if name not in ATTENTION_KERNELS:
        return f"unknown attention kernel {name!r}; choose one of {ATTENTION_KERNELS} or 'auto'"
    if dtype not in GPU_DTYPES:
        return f"the triton attention kernels take bf16/fp16, got {dtype}"
    if d > MAX_HEAD_DIM:
        return f"head_dim {d} > {MAX_HEAD_DIM}"
    return triton_reason(device)


def report_name(choice: str, device) -> str:
    """The report's kernel column before any call: the forced name, or auto's rule."""
    if choice != "auto":
        return choice
    return "reference" if torch.device(device).type == "cpu" else f"auto (splitkv if Lq <= {SPLITKV_MAX_QUERIES}, else flash)"
