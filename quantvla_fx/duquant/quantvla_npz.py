"""Reader for QuantVLA / openpi_duquant per-layer ``.npz`` packs (duquant_preprocess.py layout).

One file per linear, named by the sanitized FQN (``[^A-Za-z0-9_.-]`` -> ``_``, ``..`` -> ``.``);
the FQN is taken to be the file stem.  Fields: ``weight_scale`` f32 [N], ``meta`` (JSON string:
in_features, out_features, block_size, block_out_size, enable_permute, lambda_smooth), ``perm``
int64 [K] (optional), ``Rin_{b}`` f32 [B, B] listed in ``R_in_blocks``, ``Rout_{b}`` f32 [Bo, Bo]
listed in ``R_out_blocks``.  Their transform is x~ = x P R_in (permutation first, then one rotation
per input block, missing blocks = identity) and W_t = R_out (W P R_in) with y = y_t @ R_out per
row block.  Mapped onto ours: ``rot1=None, perm=perm, rot2=stack(Rin), smooth=None``, R_out ->
``LayerPack.out_rot``.  Each layer keeps its own transform (QuantVLA derives it from that layer's
weight), so gate/up or q/k/v do not share one.

Their static per-input-channel activation scales (99.9th percentile, not stored in the pack) and
their MSE-searched weight scales are not used: activations are quantized per token, dynamically,
and weights by RTN on the transformed weight; ``weight_scale`` is kept for validation only.
Files are opened with ``allow_pickle=False``; every file is read and checked before anything is
returned, so a bad pack never leaves a half-applied set.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import PackError
from .packs import NPZ_SOURCE, LayerPack, Packs
from .transform import DuQuantTransform, check_permutation, check_rotation

log = logging.getLogger("quantvla_fx")

_FIELD_RE = re.compile(r"^(weight_scale|meta|perm|R_in_blocks|R_out_blocks|Rin_\d+|Rout_\d+)$")
_logged_static_scales = False


def sanitize_name(name: str) -> str:
    """QuantVLA's file name for a layer FQN (duquant_preprocess.sanitize_name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).replace("..", ".")


def _read_fields(path: str, fqn: str) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise PackError.at(path, fqn, "file", f"not a readable .npz archive: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise PackError.at(path, fqn, "file", "is a single .npy array, not an .npz archive")
    fields = {}
    with npz:
        for name in npz.files:
            if not _FIELD_RE.match(name):
                raise PackError.at(path, fqn, name, "unknown field (not part of the QuantVLA pack layout)")
            try:
                fields[name] = npz[name]
            except ValueError as e:  # numpy refuses object (pickled) arrays with allow_pickle=False
                raise PackError.at(path, fqn, name, f"holds a pickled object array; refusing to unpickle ({e})") from None
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise PackError.at(path, fqn, name, f"unreadable: {e}") from None
    return fields


def _meta(fields, path, fqn) -> dict:
    def fail(problem):
        raise PackError.at(path, fqn, "meta", problem)

    if "meta" not in fields:
        fail("missing field")
    raw = fields["meta"]
    if raw.dtype.kind not in "US" or raw.size != 1:
        fail(f"expected a JSON string, got dtype {raw.dtype} shape {raw.shape}")
    text = raw.reshape(()).item()
    try:
        meta = json.loads(text.decode() if isinstance(text, bytes) else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"invalid JSON: {e}")
    if not isinstance(meta, dict):
        fail(f"expected a JSON object, got {type(meta).__name__}")
    for key in ("in_features", "out_features", "block_size"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(f"'{key}' must be a positive integer, got {v!r}")
    bo = meta.setdefault("block_out_size", meta["block_size"])
    if not isinstance(bo, int) or isinstance(bo, bool) or bo <= 0:
        fail(f"'block_out_size' must be a positive integer, got {bo!r}")
    if not isinstance(meta.get("enable_permute", True), bool):
        fail(f"'enable_permute' must be a boolean, got {meta['enable_permute']!r}")
    return meta


def _block_stack(fields, prefix, list_name, size, total, size_key, path, fqn) -> Optional[torch.Tensor]:
    """Stack ``{prefix}{b}`` blocks listed in ``list_name`` into [total/size, size, size]."""
    present = sorted(n for n in fields if re.fullmatch(rf"{prefix}\d+", n))
    if list_name not in fields:
        if present:
            raise PackError.at(path, fqn, list_name, f"missing field, but {present[0]} is present")
        return None
    listed = fields[list_name]
    if listed.dtype.kind not in "iu" or listed.ndim != 1:
        raise PackError.at(path, fqn, list_name, f"expected a 1-D integer array, got dtype {listed.dtype} shape {listed.shape}")
    if total % size:
        raise PackError.at(path, fqn, "meta", f"{size_key}={size} does not divide {total}: partial blocks are not supported")
    nb = total // size
    blocks = [int(b) for b in listed]
    if len(set(blocks)) != len(blocks) or any(b < 0 or b >= nb for b in blocks):
        raise PackError.at(path, fqn, list_name, f"block indices {blocks} must be unique and in [0, {nb})")
    unlisted = sorted(set(present) - {f"{prefix}{b}" for b in blocks})
    if unlisted:
        raise PackError.at(path, fqn, unlisted[0], f"not listed in {list_name}")
    stack = torch.eye(size, dtype=torch.float32).repeat(nb, 1, 1)  # missing blocks are identity
    for b in blocks:
        name = f"{prefix}{b}"
        if name not in fields:
            raise PackError.at(path, fqn, name, f"missing field (listed in {list_name})")
        r = fields[name]
        if r.dtype.kind != "f" or r.shape != (size, size):
            raise PackError.at(path, fqn, name, f"expected float [{size}, {size}] ({size_key}), got dtype {r.dtype} shape {r.shape}")
        rt = torch.from_numpy(np.ascontiguousarray(r))
        check_rotation(rt.unsqueeze(0), size, 1, name, f"{path}: layer {fqn}")
        stack[b] = rt.to(torch.float32)
    return stack


def read_quantvla_pack(path: str) -> LayerPack:
    """One QuantVLA ``.npz`` -> a validated LayerPack (FQN = file stem)."""
    path = os.fspath(path)
    fqn = os.path.basename(path)[: -len(".npz")] if path.endswith(".npz") else os.path.basename(path)
    fields = _read_fields(path, fqn)
    meta = _meta(fields, path, fqn)
    k, n, b, bo = meta["in_features"], meta["out_features"], meta["block_size"], meta["block_out_size"]

    if "weight_scale" not in fields:
        raise PackError.at(path, fqn, "weight_scale", "missing field")
    ws = fields["weight_scale"]
    if ws.dtype.kind != "f" or ws.shape != (n,):
        raise PackError.at(path, fqn, "weight_scale", f"expected float [{n}] (out_features), got dtype {ws.dtype} shape {ws.shape}")
    weight_scale = torch.from_numpy(np.ascontiguousarray(ws)).to(torch.float32)

    perm = None
    if "perm" in fields:
        if meta.get("enable_permute") is False:
            raise PackError.at(path, fqn, "perm", "present although meta.enable_permute is false")
        p = fields["perm"]
        if p.dtype.kind not in "iu":
            raise PackError.at(path, fqn, "perm", f"dtype {p.dtype} is not an integer type")
        perm = torch.from_numpy(np.ascontiguousarray(p)).to(torch.int64)
        check_permutation(perm, k, "perm", f"{path}: layer {fqn}")
    elif meta.get("enable_permute") is True:
        raise PackError.at(path, fqn, "perm", "missing field (meta.enable_permute is true)")

    rot2 = _block_stack(fields, "Rin_", "R_in_blocks", b, k, "block_size", path, fqn)
    out_rot = _block_stack(fields, "Rout_", "R_out_blocks", bo, n, "block_out_size", path, fqn)
    transform = DuQuantTransform(in_features=k, block_size=b, smooth=None, rot1=None, perm=perm, rot2=rot2)
    lp = LayerPack(fqn=fqn, transform=transform, group=fqn, weight_clip=1.0, out_rot=out_rot,
                   weight_scale=weight_scale, source=NPZ_SOURCE + path)
    transform.validate(f"{path}: layer {fqn}")
    lp.validate(path)
    return lp


def load_quantvla_packs(paths: Sequence[str], source: Optional[str] = None) -> Packs:
    """Read and validate every file first; return Packs only if all of them are good."""
    global _logged_static_scales
    if not paths:
        raise PackError.at(source or "<none>", "(all layers)", "path", "no .npz packs given")
    layers = [read_quantvla_pack(p) for p in sorted(paths)]
    if not _logged_static_scales:
        log.info("QuantVLA packs: their static per-channel activation scales are ignored; activations "
                 "are quantized per token (dynamic, symmetric int8), weights by RTN on W P R_in")
        _logged_static_scales = True
    sizes = sorted({lp.transform.block_size for lp in layers})
    meta = {"format": "quantvla_npz", "block_size": sizes[0] if len(sizes) == 1 else sizes,
            "bits": "w4a8", "alpha": None, "source": NPZ_SOURCE + (source or os.path.dirname(sorted(paths)[0]))}
    packs = Packs(layers, meta=meta, path=source)
    return packs
