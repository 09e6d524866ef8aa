"""DuQuantTransform: the input transform one group of linears shares, and its exact weight side.

Activation side (online):  x -> x / smooth -> block-rotate by rot1 -> x[..., perm] -> block-rotate
by rot2.  Weight side (offline): W -> W * smooth -> the same steps along K, with every rotation R
replaced by R^-T.  For an orthogonal R that is R itself; using the exact inverse of the *stored*
fp32 matrices makes ``transform_activation(x) @ transform_weight(w).T == x @ w.T`` hold to fp64
rounding instead of to the ~1e-7 orthogonality error of an fp32 rotation.

A rotation tensor is [nb, B, B] (one matrix per block: QuantVLA) or [1, B, B] (one matrix shared
by all blocks: DuQuant's code).  Everything on the activation path is plain aten ops
(unflatten/reshape, matmul, index_select) so Dynamo/Inductor can trace it with symbolic M, and
compiled graphs run these very functions (apply_activation_transform, restore_rows), traced.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .errors import PackError

# max |R R^T - I| (computed in fp64) accepted for a stored rotation: fp32 storage of an exactly
# orthogonal matrix gives ~1e-7; float32 SVDs (QuantVLA) ~1e-6.
ORTHO_TOL = 1e-4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs are rotated in fp32: the int8 quantization that follows upcasts anyway, and a
    # bf16 rotation would add error of the order of the int8 step.
    return torch.promote_types(dtype, torch.float32)


class Blocks(NamedTuple):
    """How a rotation tiles the last dim: ``count`` blocks of ``size``, ``shared`` one matrix by all."""

    count: int
    size: int
    shared: bool

    @staticmethod
    def of(rot: Tensor, k: int) -> "Blocks":
        return Blocks(k // rot.shape[-1], rot.shape[-1], rot.shape[0] == 1)


def block_rotate(x: Tensor, rot: Tensor, blocks: Optional[Blocks] = None) -> Tensor:
    """x [..., nb*B] @ blockdiag(rot) where rot is [1, B, B] (shared) or [nb, B, B].

    The one block rotation: compiled graphs trace it with rot a graph input, whose shape cannot
    be read while tracing, so they pass ``blocks``; everyone else lets it be read from rot.
    """
    b = blocks if blocks is not None else Blocks.of(rot, x.shape[-1])
    if b.shared:
        return torch.matmul(x.unflatten(-1, (b.count, b.size)), rot[0]).flatten(-2)
    # Per-block matrices: put the block index first and run one batched matmul
    # ([nb, T, B] @ [nb, B, B]); broadcasting [..., nb, 1, B] @ [nb, B, B] would materialize rot
    # once per token.
    xb = x.reshape(-1, b.count, b.size).transpose(0, 1)
    return torch.bmm(xb, rot).transpose(0, 1).reshape_as(x)


def apply_activation_transform(x: Tensor, dtype: torch.dtype, smooth: Optional[Tensor] = None,
                               rot1: Optional[Tensor] = None, perm: Optional[Tensor] = None,
                               rot2: Optional[Tensor] = None, blocks1: Optional[Blocks] = None,
                               blocks2: Optional[Blocks] = None) -> Tensor:
    """x -> x / smooth -> rot1 -> x[..., perm] -> rot2, in ``dtype``; every step optional.

    The tensors must already be in ``dtype`` (perm int64) on x's device.  DuQuantTransform runs
    this, and compiled graphs trace it with the tensors as graph inputs: one activation path.
    """
    x = x.to(dtype)
    if smooth is not None:
        x = x / smooth
    if rot1 is not None:
        x = block_rotate(x, rot1, blocks1)
    if perm is not None:
        x = torch.index_select(x, -1, perm)
    if rot2 is not None:
        x = block_rotate(x, rot2, blocks2)
    return x


def rotate_weight_rows(w: Tensor, out_rot: Tensor) -> Tensor:
    """QuantVLA's output rotation on the weight: rows of block b become R_out_b^-T @ W[rows_b].

    R^-T equals R_out_b for an orthogonal matrix; the exact inverse of the stored fp32 matrix makes
    ``restore_output(x @ rotate_weight_rows(w, R).T, R) == x @ w.T`` hold to fp64 rounding.
    Returns fp32 (or fp64 for an fp64 weight).
    """
    nbo, bo = out_rot.shape[0], out_rot.shape[-1]
    n = w.shape[0]
    r = _inverse_transpose(out_rot, w.device)
    r = r.expand(n // bo, bo, bo) if nbo == 1 else r
    wd = w.detach().to(torch.float64).reshape(n // bo, bo, -1)
    return torch.bmm(r, wd).reshape(n, -1).to(_compute_dtype(w.dtype))


def restore_output(y: Tensor, out_rot: Tensor) -> Tensor:
    """Undo the output rotation on a GEMM result: y[..., rows_b] @ R_out_b (QuantVLA "restore")."""
    dtype = _compute_dtype(y.dtype)
    return restore_rows(y, out_rot.to(device=y.device, dtype=dtype), Blocks.of(out_rot, y.shape[-1]), dtype, y.dtype)


def restore_rows(y: Tensor, out_rot: Tensor, blocks: Blocks, dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """restore_output with out_rot already in ``dtype`` on y's device: what compiled graphs trace."""
    return block_rotate(y.to(dtype), out_rot, blocks).to(out_dtype)


def tensor_fingerprint(t: Optional[Tensor]) -> Optional[str]:
    """sha1 of a tensor's dtype, shape and bytes (None for None): a stable cache-key part."""
    if t is None:
        return None
    h = hashlib.sha1()
    _hash_tensor(h, "t", t)
    return h.hexdigest()


def _hash_tensor(h, name: str, t: Optional[Tensor]) -> None:
    if t is None:
        h.update(f"{name}:none;".encode())
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _as_rotation(r: Optional[Tensor]) -> Optional[Tensor]:
    if r is None:
        return None
    r = r.detach()
    if r.dim() == 2:  # a single [B, B] matrix means "shared by all blocks"
        r = r.unsqueeze(0)
    return r.to(torch.float32).contiguous()


@dataclass(eq=False)
class DuQuantTransform:
    """One input transform, shared by all linears that read the same activation."""

    in_features: int
    block_size: int = 128
    smooth: Optional[Tensor] = None  # [K] fp32 > 0
    rot1: Optional[Tensor] = None  # [nb|1, B, B] fp32
    perm: Optional[Tensor] = None  # [K] int64
    rot2: Optional[Tensor] = None  # [nb|1, B, B] fp32
    _fp_cache: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        self.in_features, self.block_size = int(self.in_features), int(self.block_size)
        if self.smooth is not None:
            self.smooth = self.smooth.detach().to(torch.float32).contiguous()
        if self.perm is not None:
            self.perm = self.perm.detach().to(torch.int64).contiguous()
        self.rot1, self.rot2 = _as_rotation(self.rot1), _as_rotation(self.rot2)

    # -- properties --------------------------------------------------------------------------
    @property
    def has_rotation(self) -> bool:
        return self.rot1 is not None or self.perm is not None or self.rot2 is not None

    def tensors(self) -> dict[str, Optional[Tensor]]:
        return {"smooth": self.smooth, "rot1": self.rot1, "perm": self.perm, "rot2": self.rot2}

    # -- activation side ---------------------------------------------------------------------
    def rotate_activation(self, x: Tensor, rot1: Optional[Tensor] = None, perm: Optional[Tensor] = None,
                          rot2: Optional[Tensor] = None) -> Tensor:
        """rot1 -> perm -> rot2 along the last dim (no smoothing). Arguments override the stored
        tensors."""
        return self._activation(x, False, self.rot1 if rot1 is None else rot1,
                                self.perm if perm is None else perm, self.rot2 if rot2 is None else rot2)

    def transform_activation(self, x: Tensor) -> Tensor:
        return self._activation(x, True, self.rot1, self.perm, self.rot2)

    def _activation(self, x: Tensor, smooth: bool, rot1, perm, rot2) -> Tensor:
        dtype = _compute_dtype(x.dtype)
        on = lambda t: None if t is None else t.to(device=x.device, dtype=dtype)  # noqa: E731
        return apply_activation_transform(
            x, dtype, on(self.smooth) if smooth else None, on(rot1),
            None if perm is None else perm.to(x.device), on(rot2))

    # -- weight side -------------------------------------------------------------------------
    def transform_weight(self, w: Tensor) -> Tensor:
        """[N, K] -> [N, K] in the rotated basis (fp64 math; returns fp32 or fp64)."""
        if w.dim() != 2 or w.shape[1] != self.in_features:
            raise ValueError(f"transform_weight: expected [N, {self.in_features}], got {tuple(w.shape)}")
        out_dtype = _compute_dtype(w.dtype)
        wd = w.detach().to(torch.float64)
        if self.smooth is not None:
            wd = wd * self.smooth.to(device=w.device, dtype=torch.float64)
        if self.rot1 is not None:
            wd = block_rotate(wd, _inverse_transpose(self.rot1, w.device))
        if self.perm is not None:
            wd = wd.index_select(-1, self.perm.to(w.device))
        if self.rot2 is not None:
            wd = block_rotate(wd, _inverse_transpose(self.rot2, w.device))
        return wd.to(out_dtype)

    # -- identity and checks -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha1 of block size, K and the tensors' bytes; stable across processes."""
        key = (self.in_features, self.block_size) + tuple(
            (id(t), t._version) if t is not None else None for t in self.tensors().values())
        if self._fp_cache and self._fp_cache[0] == key:
            return self._fp_cache[1]
        h = hashlib.sha1(f"duquant:v1:K={self.in_features}:B={self.block_size};".encode())
        for name, t in self.tensors().items():
            _hash_tensor(h, name, t)
        self._fp_cache = (key, h.hexdigest())
        return self._fp_cache[1]

    def validate(self, where: str) -> None:
        """Raise PackError (naming ``where`` and the field) unless every tensor is well formed."""
        k, b = self.in_features, self.block_size

        def fail(fieldname, problem):
            raise PackError(f"{where}: field '{fieldname}': {problem}", file=where, field=fieldname)

        if k <= 0:
            fail("in_features", f"must be positive, got {k}")
        if b <= 0:
            fail("block_size", f"must be positive, got {b}")
        if self.smooth is not None:
            s = self.smooth
            if tuple(s.shape) != (k,):
                fail("smooth", f"shape {tuple(s.shape)} != ({k},)")
            if not bool(torch.isfinite(s).all()):
                fail("smooth", "contains NaN or Inf")
            if not bool((s > 0).all()):
                fail("smooth", f"must be > 0, min is {s.min().item():g}")
        if (self.rot1 is not None or self.rot2 is not None) and k % b:
            fail("block_size", f"in_features {k} is not a multiple of block_size {b}")
        for name in ("rot1", "rot2"):
            r = getattr(self, name)
            if r is not None:
                check_rotation(r, b, k // b, name, where)
        if self.perm is not None:
            check_permutation(self.perm, k, "perm", where)


def _inverse_transpose(rot: Tensor, device) -> Tensor:
    r = rot.to(device=device, dtype=torch.float64)
    return torch.linalg.inv(r).transpose(-1, -2)


def check_rotation(r: Tensor, b: int, nb: int, name: str, where: str, tol: float = ORTHO_TOL) -> None:
    """r must be [nb, b, b] or [1, b, b], finite and orthogonal within ``tol`` (fp64 check)."""
    def fail(problem):
        raise PackError(f"{where}: field '{name}': {problem}", file=where, field=name)

    if r.dim() != 3 or r.shape[0] not in (1, nb) or tuple(r.shape[1:]) != (b, b):
        fail(f"shape {tuple(r.shape)}, expected ({nb}, {b}, {b}) or (1, {b}, {b})")
    if not r.dtype.is_floating_point:
        fail(f"dtype {r.dtype} is not floating point")
    rd = r.detach().to(torch.float64)
    if not bool(torch.isfinite(rd).all()):
        fail("contains NaN or Inf")
    err = (rd @ rd.transpose(-1, -2) - torch.eye(b, dtype=torch.float64, device=rd.device)).abs().amax().item()
    if err > tol:
        fail(f"not orthogonal: max|R R^T - I| = {err:.3g} > {tol:g}")


def check_permutation(p: Tensor, k: int, name: str, where: str) -> None:
    def fail(problem):
        raise PackError(f"{where}: field '{name}': {problem}", file=where, field=name)

    if p.dtype.is_floating_point or p.dtype == torch.bool or p.is_complex():
        fail(f"dtype {p.dtype} is not an integer type")
    if tuple(p.shape) != (k,):
        fail(f"shape {tuple(p.shape)} != ({k},)")
    seen = torch.zeros(k, dtype=torch.bool)
    pl = p.detach().cpu().to(torch.int64)
    if bool(((pl < 0) | (pl >= k)).any()):
        fail(f"values outside [0, {k})")
    seen[pl] = True
    if not bool(seen.all()):
        fail(f"not a permutation of 0..{k - 1} ({int((~seen).sum())} indices missing)")
