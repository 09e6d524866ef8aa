"""Load and save Pi05 weights as safetensors (no pickle).

Accepted layouts:
- openpi-converted ``model.safetensors``: keys are ``PI0Pytorch.state_dict()`` names, with one of
  the tied pair ``...language_model.embed_tokens.weight`` / ``...paligemma.lm_head.weight``
  usually dropped (safetensors de-duplicates shared tensors);
- lerobot: the same keys prefixed with ``model.``;
- HF-style shards: ``model.safetensors.index.json`` + shard files.
The config comes from the caller, else ``config.json`` beside the weights, else the ``config``
entry in the safetensors header.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torch import nn

from .config import Pi05Config, Pi05ConfigError
from .dtype_policy import apply_dtype_policy, canonical_policy, cast_for_policy, param_dtype
from .initialization import init_module
from .paligemma import EMBED_KEY, LM_HEAD_KEY

log = logging.getLogger("quantvla_fx")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
LEROBOT_PREFIX = "model."
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the offending keys."""


# ------------------------------------------------------------------------- files
def resolve_weight_files(path: str | os.PathLike) -> list[Path]:
    """A directory (``model.safetensors`` or a shard index), a ``.safetensors`` file or an index."""
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return [p / WEIGHTS_NAME]
        if (p / INDEX_NAME).is_file():
            return _shards_from_index(p / INDEX_NAME)
        found = sorted(x.name for x in p.iterdir())[:10]
        raise CheckpointError(f"{p}: no {WEIGHTS_NAME} or {INDEX_NAME} in this directory (found: {found})")
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.name.endswith(".index.json"):
        return _shards_from_index(p)
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: only .safetensors checkpoints are supported (pickle formats are refused)")
    return [p]


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors shard index ({e})") from e
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {shard.name} is missing")
    return shards


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); it is truncated, corrupt or not a "
                              "safetensors file") from e


def resolve_config(config: Pi05Config | str | os.PathLike | None, files: list[Path]) -> Pi05Config:
    if isinstance(config, Pi05Config):
        return config
    if config is not None:
        text = str(config)
        if os.path.isfile(text):
            return Pi05Config.from_json(text)
        try:
            return Pi05Config.preset(text)
        except Pi05ConfigError as e:
            raise CheckpointError(f"config {text!r} is neither a config file nor a preset ({e})") from e
    beside = files[0].parent / CONFIG_NAME
    if beside.is_file():
        log.info("Pi05: config from %s", beside)
        return Pi05Config.from_json(beside)
    with _open(files[0]) as f:
        meta = f.metadata() or {}
    if "config" in meta:
        log.info("Pi05: config from the header of %s", files[0])
        try:
            return Pi05Config.from_json(meta["config"])
        except Pi05ConfigError as e:
            raise CheckpointError(f"{files[0]}: the config in its header is invalid ({e})") from e
    raise CheckpointError(f"no {CONFIG_NAME} beside {files[0]} and no config in its header; pass "
                          "config=Pi05Config.pi05_libero() (or a preset name such as 'pi05_base')")


# ----------------------------------------------------------------------- loading
def _index_keys(files: list[Path]) -> dict[str, tuple[Path, str, str, tuple[int, ...]]]:
    """model key -> (file, stored key, safetensors dtype, shape), lerobot's ``model.`` stripped."""
    index: dict[str, tuple[Path, str, str, tuple[int, ...]]] = {}
    for file in files:
        with _open(file) as f:
            for stored in f.keys():
                sl = f.get_slice(stored)
                key = stored[len(LEROBOT_PREFIX):] if stored.startswith(LEROBOT_PREFIX) else stored
                if key in index:
                    raise CheckpointError(f"{file}: key {key!r} appears twice ({index[key][1]!r} in "
                                          f"{index[key][0]} and {stored!r})")
                index[key] = (file, stored, sl.get_dtype(), tuple(sl.get_shape()))
    return index


def _fmt(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in shown) + more


def describe_checkpoint(path: str | os.PathLike, config: Pi05Config | str | None = None
                        ) -> tuple[Pi05Config, dict[str, tuple[str, tuple[int, ...]]]]:
    """(config, model key -> (safetensors dtype, shape)) from the headers alone: no tensor is read."""
    files = resolve_weight_files(path)
    cfg = resolve_config(config, files)
    index = _index_keys(files)
    tied = [k for k in (EMBED_KEY, LM_HEAD_KEY) if k in index]
    if len(tied) == 1:
        index[LM_HEAD_KEY if tied[0] == EMBED_KEY else EMBED_KEY] = index[tied[0]]
    return cfg, {k: (v[2], v[3]) for k, v in index.items()}


def load_checkpoint(model_cls, path: str | os.PathLike, config: Pi05Config | str | None = None, strict: bool = True,
                    dtype_policy: str = "float32", device: torch.device | str = "cpu") -> nn.Module:
    """Build ``model_cls(config)`` (a :class:`Pi05`) from a checkpoint; ``Pi05.from_pretrained`` calls this.

    The class is passed in so that this module does not import the model (the model imports it).

    ``strict``: every model key must be present and nothing else (the tied embedding/lm_head
    pair counts as present if either name is). With ``strict=False`` missing parameters are
    randomly initialised and unexpected keys ignored (both logged); shape and dtype problems are
    always errors. ``dtype_policy``: ``"float32"`` or ``"openpi_bf16"``.
    """
    policy = canonical_policy(dtype_policy)
    files = resolve_weight_files(path)
    cfg = resolve_config(config, files)
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"

    with torch.device("meta"):
        model = model_cls(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    index = _index_keys(files)

    # The tied pair: either name supplies both.
    tied = [k for k in (EMBED_KEY, LM_HEAD_KEY) if k in index]
    if len(tied) == 1:
        other = LM_HEAD_KEY if tied[0] == EMBED_KEY else EMBED_KEY
        index[other] = index[tied[0]]

    missing = [k for k in expected if k not in index]
    unexpected = [k for k in index if k not in expected]
    bad_shape = [f"{k}: checkpoint {list(index[k][3])} vs model {list(expected[k])}"
                 for k in expected if k in index and index[k][3] != expected[k]]
    bad_dtype = [f"{k}: {index[k][2]} (expected a float tensor)"
                 for k in expected if k in index and index[k][2] not in _FLOAT_DTYPES]
    problems = []
    if strict and missing:
        problems.append(_fmt("missing keys", missing))
    if strict and unexpected:
        problems.append(_fmt("unexpected keys", unexpected))
    if bad_shape:
        problems.append(_fmt("shape mismatches", bad_shape))
    if bad_dtype:
        problems.append(_fmt("wrong dtypes", bad_dtype))
    if problems:
        raise CheckpointError(f"cannot load Pi05 weights from {where}:\n" + "\n".join(problems))
    if missing:
        log.warning("Pi05: %d key(s) missing from %s, randomly initialised: %s", len(missing), where, missing[:_MAX_LISTED])
    if unexpected:
        log.warning("Pi05: %d unexpected key(s) in %s ignored: %s", len(unexpected), where, unexpected[:_MAX_LISTED])

    state = _read_tensors(index, [k for k in expected if k in index], policy, device)
    _check_tied_pair(state, index, strict)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _materialize_missing(model, device)
    apply_dtype_policy(model, policy)
    model.eval()
    log.info("Pi05: loaded %d tensors from %s (dtype policy %s, device %s)", len(state), where, policy, device)
    return model


def _read_tensors(index, keys: list[str], policy: str, device) -> dict[str, torch.Tensor]:
    """Read, cast and move one tensor at a time (peak memory ~ the loaded model, not twice it).
    A stored tensor that supplies two names (the tied pair) is read once."""
    handles = {}
    state: dict[str, torch.Tensor] = {}
    done: dict[tuple[Path, str], str] = {}  # (file, stored key) -> first model key loaded from it
    try:
        for key in keys:
            file, stored = index[key][0], index[key][1]
            first = done.get((file, stored))
            if first is not None and state[first].dtype == param_dtype(key, policy):
                state[key] = state[first]
                continue
            if file not in handles:
                handles[file] = _open(file).__enter__()
            try:
                raw = handles[file].get_tensor(stored)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {stored!r} ({e})") from e
            state[key] = cast_for_policy(key, raw, policy).to(device)
            done.setdefault((file, stored), key)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return state


def _check_tied_pair(state: dict[str, torch.Tensor], index, strict: bool) -> None:
    if EMBED_KEY not in state or LM_HEAD_KEY not in state:
        return
    if index[EMBED_KEY][:2] == index[LM_HEAD_KEY][:2]:
        return  # one stored tensor supplies both names
    if not torch.equal(state[EMBED_KEY], state[LM_HEAD_KEY]):
        msg = (f"{index[EMBED_KEY][0]}: {EMBED_KEY} and {LM_HEAD_KEY} differ, but the model ties them "
               "(the token embedding is the LM head)")
        if strict:
            raise CheckpointError(msg)
        log.warning("%s; using the embedding table", msg)
    state[LM_HEAD_KEY] = state[EMBED_KEY]


def _materialize_missing(model: nn.Module, device) -> None:
    """Parameters that stayed on the meta device (non-strict load) get a random init."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.is_meta for p in own):
            module.to_empty(device=device, recurse=False)
            init_module(module)
    model.tie_weights()


# ------------------------------------------------------------------------ saving
def save_pi05(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write ``model.safetensors`` (openpi layout: the tied embedding saved once, as
    ``...paligemma.lm_head.weight``, like safetensors' ``save_model``) and ``config.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    live = model.state_dict()
    if live[EMBED_KEY].data_ptr() == live[LM_HEAD_KEY].data_ptr() or torch.equal(state[EMBED_KEY], state[LM_HEAD_KEY]):
        del state[EMBED_KEY]
    config_json = model.config.to_json()
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "config": config_json})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(config_json + "\n")
    log.info("Pi05: saved %d tensors to %s", len(state), out / WEIGHTS_NAME)
    return str(out)
