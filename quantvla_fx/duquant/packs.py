"""DuQuant packs: per-layer transforms keyed by linear FQN, and our single-file safetensors format.

File layout (one ``.safetensors`` file, no pickle anywhere):
* tensors ``group.<group>.{smooth,rot1,perm,rot2}`` (each present only if not None),
  ``layer.<fqn>.{out_rot,weight_scale}`` and (version 2) ``layer.<fqn>.{int4,int4_scale}``: GPTQ's
  int4 values (canonical packing, quant/int4_pack.py) and scales;
* metadata (str -> str): ``format`` = "quantvla_fx.duquant", ``format_version``, ``meta`` (JSON:
  block size, alpha, bits, source, ...; the first four also as plain keys), ``groups`` (JSON:
  group -> in_features, block_size and (v2) ``search``: the chosen recipe and every candidate's
  score) and ``layers`` (JSON: fqn -> group, weight_clip, source and (v2) ``rounding``: method,
  group size and the digest of the float weight the int4 values were computed from).
Version 1 files (no rounding, no search record) still load.
Layers of one group share one ``DuQuantTransform`` object, in memory and after a load.
``load.py`` picks the reader for a path (this format or QuantVLA's ``.npz``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor

from ..quant.int4_pack import pack_int4
from .errors import PackError
from .transform import DuQuantTransform, check_rotation, tensor_fingerprint

FORMAT = "quantvla_fx.duquant"
FORMAT_VERSION = 2  # 2: GPTQ rounding and the search record
PACK_FILENAME = "duquant_packs.safetensors"
GROUP_FIELDS = ("smooth", "rot1", "perm", "rot2")
LAYER_FIELDS = ("out_rot", "weight_scale")
ROUNDING_FIELDS = ("int4", "int4_scale")
NPZ_SOURCE = "quantvla_npz:"
ALL_LAYERS = "(all layers)"

__all__ = ["PackError", "LayerPack", "Packs", "FORMAT", "FORMAT_VERSION", "PACK_FILENAME"]


def weight_digest(w: Tensor) -> str:
    """What a stored rounding is valid for: sha1 of the float weight's dtype, shape and bytes."""
    return tensor_fingerprint(w)


@dataclass(frozen=True, eq=False)
class Rounding:
    """Stored int4 values of one linear (GPTQ's), valid only for the float weight they came from.

    They cannot be recomputed from the weight alone (they depend on the calibration inputs), so the
    weight recipe uses them only while the live weight's digest equals ``weight_digest`` and the
    compile's group size equals ``group_size``; otherwise it rounds to nearest, with a warning.
    """

    packed: Tensor  # int8 [N, K/2], the canonical int4 packing
    scale: Tensor  # fp32 [N] (per channel) or [N, K/group_size]
    group_size: int
    weight_digest: str
    method: str = "gptq"

    @staticmethod
    def of(q: Tensor, scale: Tensor, group_size: int, weight: Tensor, method: str = "gptq") -> "Rounding":
        return Rounding(pack_int4(q.cpu()).contiguous(), scale.detach().cpu().float().contiguous(), int(group_size),
                        weight_digest(weight), method)

    def meta(self) -> dict:
        return {"method": self.method, "group_size": self.group_size, "weight_digest": self.weight_digest}

    def fingerprint(self) -> str:
        return f"{self.meta()}|{tensor_fingerprint(self.packed)}|{tensor_fingerprint(self.scale)}"

    def validate(self, fail) -> None:
        p, s = self.packed, self.scale
        if p.dim() != 2 or p.dtype != torch.int8:
            fail("int4", f"expected int8 [N, K/2], got {tuple(p.shape)} {p.dtype}")
        n, k = p.shape[0], 2 * p.shape[1]
        g = k if self.group_size == -1 else self.group_size
        if g <= 0 or k % g:
            fail("rounding", f"group_size {self.group_size} does not divide K={k}")
        want = (n,) if g == k else (n, k // g)
        if tuple(s.shape) != want or not s.dtype.is_floating_point:
            fail("int4_scale", f"expected float {want} for group_size {self.group_size}, got {tuple(s.shape)} {s.dtype}")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            fail("int4_scale", "must be finite and > 0")


@dataclass(eq=False)
class LayerPack:
    """What one linear needs from a pack: its (shared) input transform and weight-side extras."""

    fqn: str
    transform: DuQuantTransform
    group: str
    weight_clip: float = 1.0  # RTN clip ratio for the transformed weight (DuQuant's swc)
    out_rot: Optional[Tensor] = None  # QuantVLA R_out [nbo, Bo, Bo]: W_t = R_out W', y = y_t @ R_out
    weight_scale: Optional[Tensor] = None  # scales stored in the pack (QuantVLA), for validation only
    source: str = "quantvla_fx"
    rounding: Optional[Rounding] = None  # stored int4 values (GPTQ) instead of round-to-nearest
    search: Optional[dict] = None  # the group's search record: chosen recipe, every candidate's score

    def search_note(self) -> Optional[str]:
        """One line for the rewrite report: what the search chose, and every candidate's score."""
        r = self.search
        if not r:
            return None
        cands = ", ".join(f"{k} {v:.2f}" for k, v in r.get("candidates", {}).items())
        return (f"search chose {r['chosen']}: {r['score_db']:.2f} dB vs RTN {r['rtn_db']:.2f} dB on calibration "
                f"rows (candidates, dB: {cands})")

    @property
    def file(self) -> Optional[str]:
        return self.source[len(NPZ_SOURCE):] if self.source.startswith(NPZ_SOURCE) else None

    def validate(self, file: str) -> None:
        """Everything except the transform (validated once per group by Packs.validate)."""
        def fail(field, problem):
            raise PackError.at(file, self.fqn, field, problem)

        if not (isinstance(self.weight_clip, (int, float)) and 0.0 < float(self.weight_clip) <= 1.0):
            fail("weight_clip", f"must be in (0, 1], got {self.weight_clip!r}")
        n = None
        if self.weight_scale is not None:
            ws = self.weight_scale
            if ws.dim() != 1 or not ws.dtype.is_floating_point:
                fail("weight_scale", f"expected a 1-D float tensor, got {tuple(ws.shape)} {ws.dtype}")
            if not bool(torch.isfinite(ws).all()) or not bool((ws > 0).all()):
                fail("weight_scale", "must be finite and > 0")
            n = ws.shape[0]
        if self.out_rot is not None:
            r = self.out_rot
            if r.dim() != 3 or r.shape[1] != r.shape[2]:
                fail("out_rot", f"expected [nbo, Bo, Bo], got {tuple(r.shape)}")
            nbo = r.shape[0] if n is None else n // r.shape[1]
            if n is not None and (n % r.shape[1] or r.shape[0] not in (1, nbo)):
                fail("out_rot", f"shape {tuple(r.shape)} does not tile out_features={n}")
            check_rotation(r, r.shape[1], nbo, "out_rot", f"{file}: layer {self.fqn}")
        if self.rounding is not None:
            self.rounding.validate(fail)
            if self.rounding.packed.shape[1] * 2 != self.transform.in_features:
                fail("int4", f"K={self.rounding.packed.shape[1] * 2} != in_features {self.transform.in_features}")
            if self.out_rot is not None:
                fail("rounding", "stored int4 values with an output rotation are not supported")


class Packs(Mapping[str, LayerPack]):
    """LayerPacks keyed by linear FQN, plus ``meta`` (format version, block size, alpha, bits, source)."""

    def __init__(self, layers: Union[Iterable[LayerPack], Mapping[str, LayerPack]] = (),
                 meta: Optional[dict] = None, path: Optional[str] = None):
        self.meta: dict = dict(meta or {})
        self.path = None if path is None else os.fspath(path)
        items = layers.values() if isinstance(layers, Mapping) else layers
        self._layers: dict[str, LayerPack] = {}
        self._groups: dict[str, DuQuantTransform] = {}
        by_obj: dict[int, str] = {}
        for lp in items:
            file = self.file_of_pack(lp)
            if lp.fqn in self._layers:
                raise PackError.at(file, lp.fqn, "fqn", "appears twice")
            t = self._groups.setdefault(lp.group, lp.transform)
            if t is not lp.transform:
                raise PackError.at(file, lp.fqn, "group", f"group {lp.group!r} already has a different transform object")
            if by_obj.setdefault(id(lp.transform), lp.group) != lp.group:
                raise PackError.at(file, lp.fqn, "group", f"transform is shared with group {by_obj[id(lp.transform)]!r} under another name")
            self._layers[lp.fqn] = lp

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, fqn: str) -> LayerPack:
        return self._layers[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Packs({len(self)} layers, {len(self._groups)} groups, source={self.meta.get('source')!r}, path={self.path!r})"

    # -- groups and identity -----------------------------------------------------------------
    @property
    def groups(self) -> dict[str, DuQuantTransform]:
        return dict(self._groups)

    def members(self, group: str) -> list[str]:
        return [f for f, lp in self._layers.items() if lp.group == group]

    def file_of_pack(self, lp: LayerPack) -> str:
        return lp.file or self.path or "<in-memory packs>"

    def fingerprint(self) -> str:
        """sha1 over every layer's group, clip, transform and extras (for cache keys)."""
        h = hashlib.sha1(f"{FORMAT}:v{FORMAT_VERSION};".encode())
        for fqn in sorted(self._layers):
            lp = self._layers[fqn]
            h.update(f"{fqn}|{lp.group}|{float(lp.weight_clip)!r}|{lp.transform.fingerprint()};".encode())
            if lp.rounding is not None:
                h.update(f"rounding:{lp.rounding.fingerprint()};".encode())
            for name in LAYER_FIELDS:
                t = getattr(lp, name)
                h.update(f"{name}:none;".encode() if t is None else
                         f"{name}:{tuple(t.shape)}:".encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        for group, t in self._groups.items():
            fqns = self.members(group)
            file = self.file_of_pack(self._layers[fqns[0]])
            t.validate(f"{file}: layer {', '.join(fqns)}")
        for lp in self._layers.values():
            lp.validate(self.file_of_pack(lp))

    def check_model(self, fqns: Union[Iterable[str], Mapping[str, Any]], where: str) -> None:
        """Raise PackError for pack FQNs the model does not have.

        ``fqns`` may also map FQN -> weight shape (out, in) or the nn.Linear itself; then
        in_features and the out-side fields are checked against the layer too.
        """
        shapes = fqns if isinstance(fqns, Mapping) else None
        names = set(fqns.keys() if shapes is not None else fqns)
        unknown = [f for f in self._layers if f not in names]
        if unknown:
            lp = self._layers[unknown[0]]
            more = f" (and {len(unknown) - 1} more: {unknown[1:4]})" if len(unknown) > 1 else ""
            raise PackError(f"{where}: {self.file_of_pack(lp)}: layer {lp.fqn}: field 'fqn': "
                            f"no such linear in the model{more}", file=self.file_of_pack(lp), fqn=lp.fqn, field="fqn")
        if shapes is None:
            return
        for fqn, lp in self._layers.items():
            shape = shapes[fqn]
            if hasattr(shape, "weight"):  # an nn.Linear
                shape = shape.weight.shape
            out_f, in_f = int(shape[0]), int(shape[1])
            file = self.file_of_pack(lp)

            def fail(field, problem):
                raise PackError(f"{where}: {file}: layer {fqn}: field '{field}': {problem}", file=file, fqn=fqn, field=field)

            if lp.transform.in_features != in_f:
                fail("in_features", f"pack has {lp.transform.in_features}, the layer has {in_f}")
            if lp.weight_scale is not None and lp.weight_scale.shape[0] != out_f:
                fail("weight_scale", f"pack has {lp.weight_scale.shape[0]} rows, the layer has out_features={out_f}")
            if lp.out_rot is not None:
                bo = lp.out_rot.shape[-1]
                if out_f % bo or lp.out_rot.shape[0] not in (1, out_f // bo):
                    fail("out_rot", f"shape {tuple(lp.out_rot.shape)} does not tile out_features={out_f}")

    # -- our file format ---------------------------------------------------------------------
    def save(self, path) -> str:
        """Write one safetensors file (a directory gets ``duquant_packs.safetensors``)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PACK_FILENAME)
        tensors: dict[str, Tensor] = {}
        groups_meta: dict[str, dict] = {}
        for name, t in self._groups.items():
            groups_meta[name] = {"in_features": t.in_features, "block_size": t.block_size}
            record = self._layers[self.members(name)[0]].search
            if record:
                groups_meta[name]["search"] = record
            for field, v in t.tensors().items():
                if v is not None:
                    tensors[f"group.{name}.{field}"] = v.detach().cpu().contiguous().clone()
        layers_meta = {}
        for fqn, lp in self._layers.items():
            layers_meta[fqn] = {"group": lp.group, "weight_clip": float(lp.weight_clip), "source": lp.source}
            if lp.rounding is not None:
                layers_meta[fqn]["rounding"] = lp.rounding.meta()
                tensors[f"layer.{fqn}.int4"] = lp.rounding.packed.contiguous().clone()
                tensors[f"layer.{fqn}.int4_scale"] = lp.rounding.scale.contiguous().clone()
            for field in LAYER_FIELDS:
                v = getattr(lp, field)
                if v is not None:
                    tensors[f"layer.{fqn}.{field}"] = v.detach().cpu().contiguous().clone()
        metadata = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION),
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
            "groups": json.dumps(groups_meta),  # insertion order = model order, kept on load
            "layers": json.dumps(layers_meta),
        }
        # Readable copies for tools that only show the header; "meta" stays the source of truth.
        metadata.update({k: str(self.meta[k]) for k in ("block_size", "alpha", "bits", "source") if k in self.meta})
        save_file(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path) -> "Packs":
        """Read our safetensors pack; validates fully before returning (nothing half-loaded)."""
        from safetensors import safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PACK_FILENAME)

        def fail(field, problem, fqn=ALL_LAYERS):
            raise PackError.at(path, fqn, field, problem)

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            fail("file", "does not exist")
        except Exception as e:  # safetensors raises its own error types for a bad header
            fail("header", f"not a readable safetensors file: {e}")
        if metadata.get("format") != FORMAT:
            fail("format", f"expected {FORMAT!r}, got {metadata.get('format')!r}")
        try:
            version = int(metadata.get("format_version", ""))
        except ValueError:
            fail("format_version", f"not an integer: {metadata.get('format_version')!r}")
        if version > FORMAT_VERSION or version < 1:
            fail("format_version", f"version {version} is not supported (this reader knows 1..{FORMAT_VERSION})")
        parsed = {}
        for key in ("meta", "groups", "layers"):
            try:
                parsed[key] = json.loads(metadata[key])
            except KeyError:
                fail(key, "missing from the metadata")
            except json.JSONDecodeError as e:
                fail(key, f"invalid JSON: {e}")
            if not isinstance(parsed[key], dict):
                fail(key, f"expected a JSON object, got {type(parsed[key]).__name__}")
        groups_meta, layers_meta = parsed["groups"], parsed["layers"]
        for fqn, lm in layers_meta.items():
            if not isinstance(lm, dict) or lm.get("group") not in groups_meta:
                fail("group", f"refers to unknown group {lm.get('group') if isinstance(lm, dict) else lm!r}", fqn)

        group_tensors: dict[str, dict[str, Tensor]] = {g: {} for g in groups_meta}
        layer_tensors: dict[str, dict[str, Tensor]] = {f: {} for f in layers_meta}
        for key, t in tensors.items():
            kind, _, rest = key.partition(".")
            owner, _, field = rest.rpartition(".")
            if kind == "group" and owner in group_tensors and field in GROUP_FIELDS:
                group_tensors[owner][field] = t
            elif kind == "layer" and owner in layer_tensors and (field in LAYER_FIELDS or
                                                                 (version >= 2 and field in ROUNDING_FIELDS)):
                layer_tensors[owner][field] = t
            else:
                fail(key, "unknown tensor (not a known group/layer field)", owner or ALL_LAYERS)

        transforms = {}
        for g, gm in groups_meta.items():
            fqns = [f for f, lm in layers_meta.items() if isinstance(lm, dict) and lm.get("group") == g] or [ALL_LAYERS]
            try:
                k, b = int(gm["in_features"]), int(gm["block_size"])
            except (KeyError, TypeError, ValueError) as e:
                fail("groups", f"group {g!r}: bad in_features/block_size: {e!r}", ", ".join(fqns))
            gt = group_tensors[g]
            for field in ("rot1", "rot2", "smooth"):
                if field in gt and not gt[field].dtype.is_floating_point:
                    fail(field, f"dtype {gt[field].dtype} is not floating point", ", ".join(fqns))
            if "perm" in gt and gt["perm"].dtype.is_floating_point:
                fail("perm", f"dtype {gt['perm'].dtype} is not an integer type", ", ".join(fqns))
            transforms[g] = DuQuantTransform(in_features=k, block_size=b, **gt)
        layers = []
        for fqn, lm in layers_meta.items():
            clip = lm.get("weight_clip", 1.0)
            if not isinstance(clip, (int, float)):
                fail("weight_clip", f"not a number: {clip!r}", fqn)
            lt = layer_tensors[fqn]
            rounding = _read_rounding(lm.get("rounding"), lt.pop("int4", None), lt.pop("int4_scale", None),
                                      lambda field, problem, fqn=fqn: fail(field, problem, fqn))
            search = groups_meta[lm["group"]].get("search") if isinstance(groups_meta[lm["group"]], dict) else None
            layers.append(LayerPack(fqn=fqn, transform=transforms[lm["group"]], group=lm["group"],
                                    weight_clip=float(clip), source=str(lm.get("source", "quantvla_fx")),
                                    rounding=rounding, search=search, **lt))
        orphans = [g for g in transforms if not any(lp.group == g for lp in layers)]
        if orphans:
            fail("groups", f"group {orphans[0]!r} has no layers")
        packs = cls(layers, meta=parsed["meta"], path=path)
        packs.validate()
        return packs



def _read_rounding(meta, packed: Optional[Tensor], scale: Optional[Tensor], fail) -> Optional[Rounding]:
    if meta is None and packed is None and scale is None:
        return None
    if not isinstance(meta, dict) or packed is None or scale is None:
        fail("rounding", "needs the rounding metadata and both tensors int4 and int4_scale")
    try:
        return Rounding(packed, scale, int(meta["group_size"]), str(meta["weight_digest"]), str(meta.get("method", "gptq")))
    except (KeyError, TypeError, ValueError) as e:
        fail("rounding", f"bad rounding metadata {meta!r}: {e!r}")
