"""Which weights quantvla freed after packing, and where their values are now (policy: float_weights.py).

A freed weight keeps its tensor object and metadata (size, stride, dtype, device: what Dynamo
guards on, so no recompile) but its storage is resized to 0 bytes, as FSDP does; its values live
in ``cpu`` (``offload``: pinned when the weight is on a GPU) or nowhere (``drop``).  While quantvla
has brought one back in place for a while (an eager call, a recompile, ``load_state_dict``) it is
*borrowed*: it holds the copy's values and keeps its freed cache key.

derived_inputs.py asks here for the cache key of a freed source (it changes with every write to
the CPU copy) and for a temporary copy on the weight's device to re-pack from.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(eq=False)
class Freed:
    ref: weakref.ref
    name: str  # the weight's path (``...mlp.up_proj.weight``), for messages
    mode: str  # "offload" | "drop"
    device: torch.device
    nbytes: int
    cpu: Optional[torch.Tensor]  # the source of truth while freed (None: dropped)
    borrowed: int = 0  # nesting depth of in-place returns to the device
    version: int = 0  # the tensor's _version when borrowed (an edit then is copied back)
    loading: bool = False  # borrowed by a load_state_dict in progress
    owners: list = field(default_factory=list)  # (module, attribute) holding it (hooks guard them)

    def key(self, t: torch.Tensor) -> tuple:
        return id(t), "freed", self.cpu._version if self.cpu is not None else -1

    def dropped_error(self, action: str) -> RuntimeError:
        return RuntimeError(
            f"quantvla: {self.name}: cannot {action}: its float weight was dropped after packing "
            "(float_weights='drop'); only the compiled graph can run this layer now. Compile with "
            "float_weights='offload' (the weight waits in CPU memory) or 'keep' to use it in float.")


REGISTRY: dict[int, Freed] = {}


def record_of(t) -> Optional[Freed]:
    r = REGISTRY.get(id(t))
    return r if r is not None and r.ref() is t else None


def is_freed(t: torch.Tensor) -> bool:
    """No storage behind a non-empty tensor (quantvla frees only tensors at storage offset 0)."""
    return t.data_ptr() == 0 and t.numel() > 0


def freed_key(t: torch.Tensor) -> Optional[tuple]:
    """The cache key of a freed or borrowed weight; None for any other tensor."""
    r = record_of(t) if id(t) in REGISTRY else None
    if r is not None and (r.borrowed or is_freed(t)):
        return r.key(t)
    if is_freed(t):
        raise RuntimeError(f"quantvla: a weight of shape {tuple(t.shape)} has no storage and was not freed by "
                           "quantvla (e.g. an FSDP-sharded parameter); it cannot be packed")
    return None


def materialized(t: torch.Tensor, dropped_ok: bool = False) -> Optional[torch.Tensor]:
    """``t`` itself, or for a freed weight a temporary copy on its device (from the CPU copy).

    A dropped weight raises an error naming it (``dropped_ok``: None instead)."""
    if not is_freed(t):
        return t
    r = record_of(t)
    if r is None:
        freed_key(t)  # raises: not freed by quantvla
    if r.cpu is None:
        if dropped_ok:
            return None
        raise r.dropped_error("re-pack it")
    return r.cpu.to(r.device)
