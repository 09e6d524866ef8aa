"""What happens to a quantized linear's float weight once its packs exist: ``float_weights``.

* ``offload`` — the weight's values move to CPU memory (pinned when it lives on a GPU), which is
  now the source of truth for re-packing; its device storage is freed.
* ``drop`` — its storage is freed and nothing is kept: the packs can never be rebuilt.
* ``keep`` — it stays where it is (workflows that edit weights on the GPU).
* ``auto`` (default) — ``offload`` for weights on an accelerator, ``keep`` for weights on the CPU
  (an offload from CPU memory to CPU memory saves nothing) and whenever ``verify_weights`` or
  ``quantize=False`` needs the weights in place.

A freed weight keeps its tensor object and metadata (Dynamo guards on them: no recompile), its
storage resized to 0 bytes as FSDP does. Only a weight whose every use in the compiled graph goes
through derived inputs is freed, and only if it belongs to a module: a weight some quantvla graph
reads in float (tied, not selected, quantize=False) stays, and is brought back if a later compile
reads it. Hooks on the owning modules keep the module usable (offload) or fail naming the layer
(drop): an eager forward borrows the weight for the call; ``state_dict()`` gives the CPU copy;
``load_state_dict`` loads into it. :func:`cpu_copy` is the copy to edit (an in-place edit re-packs
at the next call; a ``.data`` edit needs ``quantvla_fx.refresh``), :func:`restore` brings weights
back for good, :func:`resident_bytes` measures what a model holds.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from .derived_inputs import PACK_CACHE, tensor_key, tensors_of
from .graph_utils import param_fqn
from .offloaded import REGISTRY, Freed, is_freed, record_of

log = logging.getLogger("quantvla_fx")

MODES = ("auto", "keep", "offload", "drop")

# Tensors some quantvla graph reads in float, or that restore() brought back: never freed again.
_KEEP: dict[int, weakref.ref] = {}
# Per owning module: its hook handles (one set per module).
_HOOKED: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def mode_for(mode: str, t: torch.Tensor, quantize: bool = True, verify_weights: bool = False) -> str:
    """``mode`` with ``auto`` resolved for the weight ``t``."""
    if mode != "auto":
        return mode
    if not quantize or verify_weights or t.device.type == "cpu":
        return "keep"
    return "offload"


# -- the plan of one compiled graph ----------------------------------------------------------------
@dataclass(frozen=True)
class Offloader:
    """Frees one graph's float weights at the given input positions once their packs exist
    (called by DerivedInputProvider after every lookup off its fast path)."""

    positions: tuple[tuple[int, str, str], ...]  # (graph input position, weight path, mode)

    def __call__(self, args: Sequence) -> None:
        todo = [(args[pos], name, mode) for pos, name, mode in self.positions if _resident(args[pos])]
        if todo:
            free(*zip(*todo))


def _resident(t) -> bool:
    """Holds its own values: never freed, or given new ones since (``.data =``, a dropped weight loaded)."""
    if not isinstance(t, torch.Tensor) or is_freed(t):
        return False
    r = record_of(t)
    return r is None or not r.borrowed


def plan(gm: torch.fx.GraphModule, inputs, specs, config) -> Optional[Offloader]:
    """Which of this graph's inputs may be freed once packed; weights it reads in float are kept.

    ``inputs``: the graph's GraphInputs (positions, compile-time tensors); ``specs``: its derived inputs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = {i for s in specs for i in s.sources}
    for i, node in enumerate(placeholders):
        t = inputs.example[i] if i < len(inputs.example) else None
        if isinstance(t, torch.Tensor) and node.users:
            _keep(t, "read in float by a compiled graph")
    out = []
    for i in sorted(sources):
        t = inputs.example[i]
        node = placeholders[i]
        if not isinstance(t, torch.Tensor) or node.users or id(t) in _KEEP and _KEEP[id(t)]() is t:
            continue
        mode = mode_for(config.float_weights, t, config.quantize, config.verify_weights)
        if mode != "keep":
            name = (param_fqn(node) or node.name).replace("._parameters.", ".").replace("._buffers.", ".")
            out.append((i, name, mode))
    return Offloader(tuple(out)) if out else None


@contextlib.contextmanager
def borrowed(tensors: Iterable):
    """The freed weights among ``tensors`` hold their values in place for the block (a recompile
    reads them); afterwards they are freed again, unless something decided to keep them."""
    recs = [(t, r) for t in tensors if isinstance(t, torch.Tensor) and (r := record_of(t)) is not None]
    done = []
    try:
        for t, r in recs:
            if r.cpu is None and is_freed(t):
                raise r.dropped_error("compile a new graph that reads it (a recompile, e.g. for new input shapes)")
            _borrow(t, r)
            done.append((t, r))
        yield
    finally:
        for t, r in done:
            if record_of(t) is r:  # not restored meanwhile
                _give_back(t, r)


# -- freeing and bringing back ------------------------------------------------------------------
def free(tensors: Sequence[torch.Tensor], names: Sequence[str], modes: Sequence[str]) -> int:
    """Free (``offload``: after copying to CPU memory; ``drop``) each tensor owned by a module whose
    storage it alone uses; returns how many were freed."""
    owners = _owners(tensors)
    n = 0
    for t, name, mode in zip(tensors, names, modes):
        why = _why_not_free(t, owners.get(id(t)))
        if why:
            log.debug("quantvla: %s stays on %s: %s", name, t.device, why)
            continue
        old = tensor_key(t)
        r = record_of(t)
        if r is None:
            r = Freed(weakref.ref(t), name, mode, t.device, t.untyped_storage().nbytes(), None,
                      owners=owners[id(t)])
            REGISTRY[id(t)] = r
            weakref.finalize(t, _forget, id(t), r)
            for module, _ in r.owners:
                _hook(module)
        if mode == "offload":
            _copy_out(t, r)  # the values now (also after a re-pack from new ones)
        if not t.untyped_storage().resizable():  # e.g. loaded from a mapped file: give it a storage of its own
            t.data = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        t.untyped_storage().resize_(0)
        PACK_CACHE.rekey(t, old, tensor_key(t))  # the packs built from it stay valid
        n += 1
    if n:
        log.info("quantvla: freed %d float weight(s) after packing (float_weights: %s); they have no storage "
                 "now: quantvla_fx.float_weights.restore(model) before reading them directly", n,
                 ", ".join(sorted(set(modes))))
    return n


def restore(obj, keep: bool = True) -> int:
    """Bring the freed float weights of a module (or tensors) back to their device; packs stay valid.

    ``keep``: never free them again (False: a compiled graph that offloads them frees them again at
    its next call; between compiles, e.g. after ``torch._dynamo.reset()``, they stay). A dropped
    weight cannot come back: an error names it. Returns how many weights came back."""
    tensors = [t for t in tensors_of(obj, "quantvla_fx.float_weights") if record_of(t) is not None]
    dropped = [record_of(t).name for t in tensors if record_of(t).cpu is None and is_freed(t)]
    if dropped:
        raise RuntimeError(f"quantvla: cannot restore {', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''}: "
                           "dropped after packing (float_weights='drop'); only the compiled graph can run them")
    for t in tensors:
        _bring_back(t, "restored")
        if keep:
            _keep(t, "restored")
    return len(tensors)


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """The CPU copy that is the source of truth of an offloaded weight: edit it (in place) to change
    the weight. An in-place op bumps its version and re-packs at the next call; after an edit no
    version counter sees (``.data``, NumPy) call ``quantvla_fx.refresh``."""
    r = record_of(t)
    if r is None or r.cpu is None:
        state = "was dropped (float_weights='drop')" if r is not None else "is not offloaded (it holds its own values)"
        raise ValueError(f"quantvla: cpu_copy: {getattr(r, 'name', tuple(t.shape))} {state}")
    return r.cpu


def is_offloaded(t: torch.Tensor) -> bool:
    """True while quantvla holds ``t``'s values off its device (or nowhere, dropped)."""
    return record_of(t) is not None and is_freed(t)


def resident_bytes(model, device: Optional[str] = None) -> dict:
    """What a model's weights hold: ``float`` (its parameters and buffers that have storage),
    ``derived`` (quantvla's packs and other derived inputs computed from them), ``total`` (the two),
    and ``offloaded`` (the CPU copies). ``device``: count only tensors on that device type
    (e.g. ``"cuda"``); None counts every device."""
    tensors = list(tensors_of(model, "quantvla_fx.float_weights"))

    def on(t):
        return device is None or t.device.type == torch.device(device).type

    seen, flt = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if on(t) and s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            flt += s.nbytes()
    derived = sum(o.untyped_storage().nbytes() for o in PACK_CACHE.outputs_of(tensors) if on(o))
    off = sum(r.cpu.untyped_storage().nbytes() for t in tensors if (r := record_of(t)) is not None
              and r.cpu is not None)
    return {"float": flt, "derived": derived, "total": flt + derived, "offloaded": off}


# -- internals ----------------------------------------------------------------------------------
def _why_not_free(t: torch.Tensor, owners) -> str:
    if not owners:
        return "it belongs to no module (nothing could guard an eager use)"
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return "it is a view of a larger storage"
    if torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2:  # its own + this temporary
        return "another tensor shares its storage"
    if id(t) in _KEEP and _KEEP[id(t)]() is t:
        return "a compiled graph reads it in float"
    return ""


def _keep(t: torch.Tensor, why: str) -> None:
    """Never free ``t`` again; bring it back now if it is freed."""
    tid = id(t)
    _KEEP[tid] = weakref.ref(t, lambda ref: _KEEP.pop(tid, None) if _KEEP.get(tid) is ref else None)
    _bring_back(t, why)


def _bring_back(t: torch.Tensor, why: str) -> None:
    """``t`` holds its values again and is no longer ours; the packs built from it stay valid."""
    r = record_of(t)
    if r is None:
        return
    if r.cpu is None and is_freed(t):
        raise r.dropped_error(f"bring it back ({why})")
    old = tensor_key(t)
    if is_freed(t):
        _fill(t, r)
    r.borrowed = 0
    del REGISTRY[id(t)]
    PACK_CACHE.rekey(t, old, tensor_key(t))
    log.info("quantvla: %s is back on %s (%s)", r.name, t.device, why)


def _copy_out(t: torch.Tensor, r: Freed) -> None:
    # Outside inference mode: an inference tensor has no version counter, and the copy's version
    # is what tells an edit of it (a call under torch.inference_mode() is the usual way to run).
    with torch.inference_mode(False):
        if r.cpu is None:
            pin = t.device.type == "cuda" and torch.cuda.is_available()
            r.cpu = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
        r.cpu.copy_(t.detach())


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # a parameter made under inference_mode has no version counter
        return -1


def _fill(t: torch.Tensor, r: Freed) -> None:
    t.untyped_storage().resize_(r.nbytes)
    if r.cpu is not None:
        t.data.copy_(r.cpu)  # .data: no version bump. Blocking: the CPU copy may be edited right after


def _borrow(t: torch.Tensor, r: Freed) -> None:
    if r.borrowed:
        r.borrowed += 1
        return
    if not is_freed(t):
        return  # it holds its own values (e.g. `.data` was replaced): nothing to bring back
    if r.cpu is None:
        raise r.dropped_error("run it in float")
    _fill(t, r)
    r.borrowed, r.version = 1, _version(t)


def _give_back(t: torch.Tensor, r: Freed) -> None:
    if not r.borrowed:
        return
    r.borrowed -= 1
    if r.borrowed:
        return
    if r.version != -1 and _version(t) != r.version:  # edited while borrowed: the copy follows
        _copy_out(t, r)
    t.untyped_storage().resize_(0)


def _forget(tid: int, r: Freed) -> None:
    if REGISTRY.get(tid) is r:
        del REGISTRY[tid]


def _owners(tensors: Sequence[torch.Tensor]) -> dict[int, list]:
    """(module, attribute) pairs holding each tensor directly, from one scan of the live modules."""
    want = {id(t): t for t in tensors}
    found: dict[int, list] = {}
    for o in gc.get_objects():
        if not issubclass(type(o), torch.nn.Module):  # type(): a dead weakref proxy raises on isinstance
            continue
        for table in (o._parameters, o._buffers):
            for name, v in table.items():
                if v is not None and want.get(id(v)) is v:
                    found.setdefault(id(v), []).append((o, name))
    return found


def _freed_of(module: torch.nn.Module):
    for table in (module._parameters, module._buffers):
        for name, t in table.items():
            r = record_of(t) if t is not None else None
            if r is not None:
                yield name, t, r


def _hook(module: torch.nn.Module) -> None:
    if module in _HOOKED:
        return
    _HOOKED[module] = [
        module.register_forward_pre_hook(_pre_forward),
        module.register_forward_hook(_post_forward, always_call=True),
        module.register_state_dict_post_hook(_state_dict),
        module.register_load_state_dict_pre_hook(_pre_load),
        module.register_load_state_dict_post_hook(_post_load),
    ]


def _pre_forward(module, args):
    if torch.compiler.is_compiling():
        return  # traced: the compiled graph reads the packs
    for _, t, r in _freed_of(module):
        _borrow(t, r)


def _post_forward(module, args, output):
    if torch.compiler.is_compiling():
        return
    for _, t, r in _freed_of(module):
        _give_back(t, r)


def _state_dict(module, state_dict, prefix, local_metadata):
    for name, t, r in _freed_of(module):
        key = prefix + name
        if key in state_dict and is_freed(t) and not r.borrowed:
            if r.cpu is None:
                raise r.dropped_error("save it in a state_dict")
            state_dict[key] = r.cpu  # the source of truth, on the CPU


def _pre_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if local_metadata.get("assign_to_params_buffers"):
        return  # assign=True replaces the tensor objects: the new ones are packed (and freed) at the next call
    for name, t, r in _freed_of(module):
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor) or value.shape != t.shape or not is_freed(t):
            continue  # torch reports a missing key or a wrong shape and copies nothing
        if r.cpu is None:  # dropped: room for the new values, re-packed and dropped at the next call
            t.untyped_storage().resize_(r.nbytes)
            continue
        _borrow(t, r)  # torch copies into it; the post hook moves the result to the CPU copy
        r.loading = True


def _post_load(module, incompatible_keys):
    for _, t, r in _freed_of(module):
        if r.loading:
            r.loading = False
            _copy_out(t, r)  # whatever the version counter says
            r.version = _version(t)
            _give_back(t, r)

