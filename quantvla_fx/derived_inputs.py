"""Weight-derived graph inputs (packed int4 weights, scales, folded norm weights, transforms).

Dynamo reuses one compiled graph for every model instance of the same structure and after
in-place weight edits, without calling the backend again (research/torch_compile_backend.md §3).
So nothing derived from a weight is baked into the graph: each is an extra trailing graph input,
recomputed from the live weight whenever that weight's identity, version or storage changes.

* :class:`DerivedInput` — a recipe: which original graph inputs it reads, a pure function, and a
  static key (the recipe's parameters).
* :data:`PACK_CACHE` — process-wide cache keyed by (recipe key, (id, _version, data_ptr) of the
  sources); entries die with their source tensors (``weakref.finalize``), and an in-place edit
  replaces the entry of the older version.  Each entry also holds a content digest of its
  sources: every compile checks it (an edit through ``.data``, a NumPy view or under
  ``inference_mode`` bumps no version counter), and so does every call with ``verify_weights``.
* :class:`DerivedInputProvider` — per compiled graph; one tuple compare per call on the hot path.
* :func:`refresh` — forget the packs of a model's weights after an edit no counter saw.

A source whose storage quantvla freed after packing (float_weights.py, offloaded.py) is keyed by
its CPU copy's version instead, and re-packed from a temporary copy on its device.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from . import offloaded

log = logging.getLogger("quantvla_fx")


@dataclass(frozen=True)
class DerivedInput:
    names: tuple[str, ...]  # one placeholder name per output
    sources: tuple[int, ...]  # positions of the graph inputs it is computed from
    compute: Callable[..., tuple[torch.Tensor, ...]]
    key: Hashable  # everything besides the sources that determines the outputs


def tensor_key(t: torch.Tensor) -> tuple:
    """(id, version, storage) of a source; for a weight freed after packing, its CPU copy's version."""
    if id(t) in offloaded.REGISTRY or t.data_ptr() == 0:
        key = offloaded.freed_key(t)
        if key is not None:
            return key
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    return id(t), version, t.data_ptr()


def content_digest(t: torch.Tensor) -> tuple[int, int]:
    """Two integers that change with any change of ``t``'s bits (computed where ``t`` lives).

    The raw bits, read as integers, summed plainly and with position-dependent odd weights
    (wrapping int64 arithmetic is exact and order-independent); chunked to bound the memory.
    """
    flat = t.detach().reshape(-1)
    words = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.element_size() in _INT_OF_SIZE else flat.view(torch.uint8)
    plain = weighted = 0
    for start in range(0, words.numel(), _DIGEST_CHUNK):
        w = words[start:start + _DIGEST_CHUNK].to(torch.int64)
        pos = torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64)
        plain += int(w.sum())
        weighted += int((w * (pos * 2654435761 % 2147483647 | 1)).sum())
    return plain, weighted


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGEST_CHUNK = 1 << 22


class PackCache:
    """Derived tensors keyed by recipe and source identity; see the module docstring."""

    def __init__(self):
        self._entries: dict[tuple, tuple[tuple[torch.Tensor, ...], tuple]] = {}  # key -> (outputs, digests)
        self._latest: dict[tuple, tuple] = {}  # (recipe key, source ids) -> entry key
        self._watch: dict[int, tuple[weakref.ref, set]] = {}  # id -> (ref, entry keys)
        self.builds = 0
        self.generation = 0  # bumped by forget(): providers drop their last-call shortcut

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()
        self._latest.clear()
        self._watch.clear()
        self.generation += 1

    def get(self, spec: DerivedInput, sources: Sequence[torch.Tensor], check_content: bool = False) -> tuple[torch.Tensor, ...]:
        """The derived tensors for these sources; ``check_content`` also compares the sources' bits."""
        src_keys = tuple(tensor_key(t) for t in sources)
        key = (spec.key, src_keys)
        hit = self._entries.get(key)
        if hit is not None and not self._alive(sources):
            hit = None
        if hit is not None and not check_content:
            return hit[0]
        # A freed weight: a temporary copy on its device (None: dropped, nothing to read).
        real = [offloaded.materialized(t, dropped_ok=True) for t in sources]
        if hit is not None:  # check_content
            if self._digests(real, hit) == hit[1]:
                return hit[0]
            log.info("quantvla: weight content changed without a version bump; re-packing %s", spec.names)
        for t, r in zip(sources, real):
            if r is None:
                offloaded.materialized(t)  # raises: a dropped weight cannot be re-packed
        digests = self._digests(real, None) if check_content else None
        with torch.no_grad():
            out = tuple(spec.compute(*real))
        self.builds += 1
        ids = (spec.key, tuple(k[0] for k in src_keys))
        stale = self._latest.get(ids)
        if stale is not None:  # the same weights at an older version: drop that pack
            self._entries.pop(stale, None)
        if digests is None:
            digests = self._digests(real, None)
        self._entries[key] = (out, digests)
        self._latest[ids] = key
        for t in sources:
            self._watch_tensor(t, key)
        return out

    @staticmethod
    def _digests(real, hit) -> tuple:
        # A dropped weight has no bits left to compare; it cannot have changed either.
        return tuple(hit[1][i] if hit is not None and r is None else content_digest(r)
                     for i, r in enumerate(real))

    def rekey(self, t: torch.Tensor, old: tuple, new: tuple) -> int:
        """Entries computed from ``t`` under its key ``old`` now answer to ``new`` (``t`` was freed or
        brought back: same values, another key). Returns how many entries moved."""
        w = self._watch.get(id(t))
        if w is None or w[0]() is not t or old == new:
            return 0
        moved = {}
        for key in list(w[1]):
            spec_key, src_keys = key
            if old in src_keys and key in self._entries:
                new_key = (spec_key, tuple(new if k == old else k for k in src_keys))
                self._entries[new_key] = self._entries.pop(key)
                moved[key] = new_key
        for ids, key in list(self._latest.items()):
            if key in moved:
                self._latest[ids] = moved[key]
        for _, keys in self._watch.values():
            for key in keys & moved.keys():
                keys.discard(key)
                keys.add(moved[key])
        return len(moved)

    def outputs_of(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The derived tensors computed from any of ``tensors`` (each once)."""
        out: dict[int, torch.Tensor] = {}
        for t in tensors:
            w = self._watch.get(id(t))
            if w is None or w[0]() is not t:
                continue
            for key in w[1]:
                for o in self._entries.get(key, ((), ()))[0]:
                    out.setdefault(id(o), o)
        return list(out.values())

    def forget(self, tensors: Sequence[torch.Tensor]) -> int:
        """Drop every entry computed from any of ``tensors``; returns how many were dropped."""
        dropped = 0
        for t in tensors:
            w = self._watch.get(id(t))
            if w is None or w[0]() is not t:
                continue
            for key in w[1]:
                dropped += self._entries.pop(key, None) is not None
        self._latest = {k: v for k, v in self._latest.items() if v in self._entries}
        self.generation += 1
        return dropped

    def _alive(self, sources) -> bool:
        # Guards against id reuse: every source must still be the object that was watched.
        for t in sources:
            w = self._watch.get(id(t))
            if w is None or w[0]() is not t:
                return False
        return True

    def _watch_tensor(self, t: torch.Tensor, key: tuple) -> None:
        w = self._watch.get(id(t))
        if w is None or w[0]() is not t:
            ref = weakref.ref(t)
            w = (ref, set())
            self._watch[id(t)] = w
            weakref.finalize(t, self._forget_tensor, id(t), ref)
        w[1].add(key)

    def _forget_tensor(self, tid: int, ref: weakref.ref) -> None:
        w = self._watch.get(tid)
        if w is None or w[0] is not ref:
            return
        del self._watch[tid]
        for key in w[1]:
            self._entries.pop(key, None)
        self._latest = {k: v for k, v in self._latest.items() if v in self._entries}


PACK_CACHE = PackCache()


class DerivedInputProvider:
    """Computes a compiled graph's trailing inputs from its live arguments.

    ``verify_weights``: compare the sources' content on every call (see :func:`content_digest`).
    ``on_built``: called with the arguments after every lookup off the fast path (float_weights
    frees the float weights there once their packs exist).
    """

    def __init__(self, specs: Sequence[DerivedInput], cache: PackCache = PACK_CACHE, verify_weights: bool = False,
                 on_built: Optional[Callable[[Sequence], None]] = None):
        self.specs = tuple(specs)
        self.cache = cache
        self.verify_weights = verify_weights
        self.on_built = on_built
        self.positions = tuple(sorted({i for s in self.specs for i in s.sources}))
        self._last_key = None
        self._last: tuple[torch.Tensor, ...] = ()
        self._refs: tuple = ()

    def _key(self, args: Sequence) -> tuple:
        return (self.cache.generation,) + tuple(tensor_key(args[i]) for i in self.positions)

    def __call__(self, args: Sequence) -> tuple[torch.Tensor, ...]:
        key = self._key(args)
        if (not self.verify_weights and key == self._last_key
                and all(r() is args[i] for r, i in zip(self._refs, self.positions))):
            return self._last
        out: list[torch.Tensor] = []
        for spec in self.specs:
            out.extend(self.cache.get(spec, [args[i] for i in spec.sources], check_content=self.verify_weights))
        if self.on_built is not None:
            self.on_built(args)  # may free sources: their keys change
            key = self._key(args)
        self._last_key, self._last = key, tuple(out)
        self._refs = tuple(weakref.ref(args[i]) for i in self.positions)
        return self._last


def refresh(obj=None) -> int:
    """Re-pack from the current weights at the next call: after an edit no version counter saw.

    ``obj``: a module (or a ``torch.compile``-d module, or a bound method of a module), a tensor,
    or a sequence of those; None forgets every pack.  Returns the number of packs dropped.
    """
    if obj is None:
        n = len(PACK_CACHE)
        PACK_CACHE.clear()
        return n
    return PACK_CACHE.forget(list(tensors_of(obj)))


def tensors_of(obj, who: str = "quantvla_fx.refresh"):
    """The tensors of a module, compiled module, bound method of a module, tensor, or a sequence of those."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        module = getattr(obj, "_orig_mod", obj)  # an OptimizedModule wraps the user's module
        yield from module.parameters()
        yield from module.buffers()
    elif isinstance(getattr(obj, "__self__", None), torch.nn.Module):
        yield from tensors_of(obj.__self__, who)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_of(o, who)
    else:
        raise TypeError(f"{who}: expected a module, a compiled module, a bound method of a module, "
                        f"a tensor or a sequence of those; got {type(obj).__name__}")
