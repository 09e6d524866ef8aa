"""Calibration statistics: forward pre-hooks on the selected linears.

Per linear input we keep the running per-channel max |x| and a reservoir sample (Algorithm R) of
at most ``max_rows`` token rows, stored on the CPU in fp32, for the rotation search.  DuQuant
instead averages the calibration samples into one 2048-token sequence; that needs every forward
to have the same token count, which a VLA policy does not guarantee (prefix vs. denoising steps),
and averaging dampens the per-token extremes the rotation is meant to spread.  A uniform row
sample works for any shapes and keeps real extremes.  Memory: max_rows * K * 4 bytes per group.

Input groups: when a linear's input is the very tensor object another linear already saw in the
same forward (gate/up, q/k/v), the two are united (union-find) and only the first one (the owner)
records statistics.  Object identity is checked through a weak reference so a recycled ``id`` is
never mistaken for the same tensor.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class _Reservoir:
    max_rows: int
    generator: torch.Generator
    rows: Optional[Tensor] = None  # CPU fp32 [n <= max_rows, K]
    seen: int = 0

    def add(self, x: Tensor) -> None:
        t = x.shape[0]
        if t == 0 or self.max_rows <= 0:
            return
        n = 0 if self.rows is None else self.rows.shape[0]
        take = min(self.max_rows - n, t)
        if take > 0:
            head = x[:take].detach().to("cpu", torch.float32)
            self.rows = head.clone() if self.rows is None else torch.cat([self.rows, head])
        if take < t:
            # Row i (stream position g) replaces slot j ~ U{0..g} if j < max_rows.
            g = self.seen + torch.arange(take, t, dtype=torch.float64)
            j = torch.floor(torch.rand(t - take, generator=self.generator, dtype=torch.float64) * (g + 1)).to(torch.int64)
            hit = (j < self.max_rows).nonzero().flatten()
            if hit.numel():
                last = {}  # sequential semantics: a later row wins a slot chosen twice
                for i in hit.tolist():
                    last[int(j[i])] = take + i
                slots = torch.tensor(list(last.keys()))
                src = torch.tensor(list(last.values()), device=x.device)
                self.rows[slots] = x.index_select(0, src).detach().to("cpu", torch.float32)
        self.seen += t


@dataclass
class InputStats:
    """Statistics of one linear's input (only for group owners)."""

    in_features: int
    reservoir: _Reservoir
    act_max: Optional[Tensor] = None  # [K] fp32, on the activations' device
    calls: int = 0
    tokens: int = 0

    def update(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        amax = x2.abs().amax(dim=0).to(torch.float32) if x2.shape[0] else torch.zeros(x2.shape[1], device=x2.device)
        self.act_max = amax if self.act_max is None else torch.maximum(self.act_max, amax)
        self.reservoir.add(x2)
        self.calls += 1
        self.tokens += x2.shape[0]


@dataclass
class InputCollector:
    """Registers pre-hooks on ``linears`` (FQN -> nn.Linear); use as a context manager."""

    linears: dict[str, nn.Linear]
    max_rows: int = 512
    seed: int = 0
    stats: dict[str, InputStats] = field(default_factory=dict)
    _parent: dict[str, str] = field(default_factory=dict)
    _seen: dict[int, tuple] = field(default_factory=dict)
    _first_call: dict[str, int] = field(default_factory=dict)  # fqn -> rank of its first call
    _handles: list = field(default_factory=list)

    def __enter__(self) -> "InputCollector":
        try:
            for fqn, mod in self.linears.items():
                self._handles.append(mod.register_forward_pre_hook(self._hook(fqn), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def end_batch(self) -> None:
        self._seen.clear()  # identity only links linears within one forward

    def _hook(self, fqn: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor):
                return None
            self._parent.setdefault(fqn, fqn)
            self._first_call.setdefault(fqn, len(self._first_call))
            entry = self._seen.get(id(x))
            if entry is not None and entry[0]() is x:
                self._union(entry[1], fqn)
                return None
            self._seen[id(x)] = (weakref.ref(x), fqn)
            st = self.stats.get(fqn)
            if st is None:
                gen = torch.Generator().manual_seed(stable_seed(self.seed, fqn))
                st = self.stats[fqn] = InputStats(x.shape[-1], _Reservoir(self.max_rows, gen))
            st.update(x)
            return None

        return hook

    def _find(self, a: str) -> str:
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[rb] = ra

    def groups(self) -> list[list[str]]:
        """Groups of FQNs (in ``linears`` order) that were called at least once."""
        out: dict[str, list[str]] = {}
        for fqn in self.linears:
            if fqn in self._parent:
                out.setdefault(self._find(fqn), []).append(fqn)
        return list(out.values())

    def groups_in_call_order(self) -> list[list[str]]:
        """groups(), ordered by the first call of any member (the order a forward runs them)."""
        return sorted(self.groups(), key=lambda m: min(self._first_call[f] for f in m))

    def group_stats(self, members: list[str]) -> tuple[Tensor, Tensor, int]:
        """(act_max [K] on CPU, sampled rows [n, K] on CPU, tokens seen) merged over the members."""
        owned = [self.stats[f] for f in members if f in self.stats]
        act_max = torch.stack([s.act_max.cpu() for s in owned]).amax(dim=0)
        rows = torch.cat([s.reservoir.rows for s in owned if s.reservoir.rows is not None])
        if len(owned) > 1 and rows.shape[0] > self.max_rows:  # owners alternated between forwards
            gen = torch.Generator().manual_seed(stable_seed(self.seed, "+".join(members)))
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[: self.max_rows]]
        return act_max, rows, sum(s.tokens for s in owned)


def stable_seed(seed: int, name: str) -> int:
    """A per-name seed that does not depend on Python's randomized str hash."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
