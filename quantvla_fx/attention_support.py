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
ATTENTION_CHOICES = ("auto", "sdpa", "reference", "splitkv", "flash", "torch")
# "torch": PyTorch's fused SDPA behind the op, for calls without padding only.
ATTENTION_KERNELS = ("reference", "splitkv", "flash", "torch")
# openpi's additive mask value (models/pi05/masks.py); the kernels replace masked logits by it.
MASK_VALUE = -2.3819763e38
# A finite additive mask value at or below this is treated as "masked" (exp underflows to 0 in
# fp32 and a row of only masked logits is uniform unless |logit| > ~1e22).
MASKED_AT_MOST = -1e30
MAX_HEAD_DIM = 256
GPU_DTYPES = (torch.bfloat16, torch.float16)


def auto_choice(device: torch.device, dtype: torch.dtype, lq: int, d: int, padded: bool = True) -> str:
    """The kernel ``auto`` runs: reference on CPU, fp32 or shapes the Triton kernels do not take;
    PyTorch's fused SDPA for calls without padding; else split-KV, which beat flash at every Pi0.5
    shape on the H200 (``benchmarks/results/h200/bench_attention.json``: expert 10 / 50 queries
    22.5 / 20.0 µs vs 63.6 / 93.9 µs, the 968-token prefix 39.8 vs 57.8 µs, best tiles of each)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in GPU_DTYPES:
        return "reference"
    if not padded:
        return "torch"
    if triton_reason(device) or d > MAX_HEAD_DIM:
        return "reference"
    return "splitkv"


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
    if name == "torch":
        return None if dtype in GPU_DTYPES else f"PyTorch's fused SDPA is used for bf16/fp16 only, got {dtype}"
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
    return "reference" if torch.device(device).type == "cpu" else "auto (torch without padding, else splitkv)"
