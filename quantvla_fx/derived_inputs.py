"""Weight-derived graph inputs (packed int4 weights, scales, folded norm weights, transforms).

Dynamo reuses one compiled graph for every model instance of the same structure and after
in-place weight edits, without calling the backend again (research/torch_compile_backend.md §3).
So nothing derived from a weight is baked into the graph: each is an extra trailing graph input,
recomputed from the live weight whenever that weight's identity, version or storage changes.

* :class:`DerivedInput` — a recipe: which original graph inputs it reads, a pure function, and a
  static key (the recipe's parameters).
* :data:`PACK_CACHE` — process-wide cache keyed by (recipe key, (id, _version, data_ptr) of the
  sources); entries die with their source tensors (``weakref.finalize``), and an in-place edit
  replaces the entry of the older version.
* :class:`DerivedInputProvider` — per compiled graph; one tuple compare per call on the hot path.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

log = logging.getLogger("quantvla_fx")


@dataclass(frozen=True)
class DerivedInput:
    names: tuple[str, ...]  # one placeholder name per output
    sources: tuple[int, ...]  # positions of the graph inputs it is computed from
    compute: Callable[..., tuple[torch.Tensor, ...]]
    key: Hashable  # everything besides the sources that determines the outputs


def _tensor_key(t: torch.Tensor) -> tuple[int, int, int]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    return id(t), version, t.data_ptr()


class PackCache:
    """Derived tensors keyed by recipe and source identity; see the module docstring."""

    def __init__(self):
        self._entries: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._latest: dict[tuple, tuple] = {}  # (recipe key, source ids) -> entry key
        self._watch: dict[int, tuple[weakref.ref, set]] = {}  # id -> (ref, entry keys)
        self.builds = 0

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()
        self._latest.clear()
        self._watch.clear()

    def get(self, spec: DerivedInput, sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        src_keys = tuple(_tensor_key(t) for t in sources)
        key = (spec.key, src_keys)
        hit = self._entries.get(key)
        if hit is not None and self._alive(sources):
            return hit
        with torch.no_grad():
            out = tuple(spec.compute(*sources))
        self.builds += 1
        ids = (spec.key, tuple(k[0] for k in src_keys))
        stale = self._latest.get(ids)
        if stale is not None:  # the same weights at an older version: drop that pack
            self._entries.pop(stale, None)
        self._entries[key] = out
        self._latest[ids] = key
        for t in sources:
            self._watch_tensor(t, key)
        return out

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
            weakref.finalize(t, self._forget, id(t), ref)
        w[1].add(key)

    def _forget(self, tid: int, ref: weakref.ref) -> None:
        w = self._watch.get(tid)
        if w is None or w[0] is not ref:
            return
        del self._watch[tid]
        for key in w[1]:
            self._entries.pop(key, None)
        self._latest = {k: v for k, v in self._latest.items() if v in self._entries}


PACK_CACHE = PackCache()


class DerivedInputProvider:
    """Computes a compiled graph's trailing inputs from its live arguments."""

    def __init__(self, specs: Sequence[DerivedInput], cache: PackCache = PACK_CACHE):
        self.specs = tuple(specs)
        self.cache = cache
        self.positions = tuple(sorted({i for s in self.specs for i in s.sources}))
        self._last_key = None
        self._last: tuple[torch.Tensor, ...] = ()
        self._refs: tuple = ()

    def __call__(self, args: Sequence) -> tuple[torch.Tensor, ...]:
        key = tuple(_tensor_key(args[i]) for i in self.positions)
        if key == self._last_key and all(r() is args[i] for r, i in zip(self._refs, self.positions)):
            return self._last
        out: list[torch.Tensor] = []
        for spec in self.specs:
            out.extend(self.cache.get(spec, [args[i] for i in spec.sources]))
        self._last_key, self._last = key, tuple(out)
        self._refs = tuple(weakref.ref(args[i]) for i in self.positions)
        return self._last
