"""QuantVLAConfig: what to quantize and how, validated when it is created.

Three sources, one dataclass: keyword arguments, the ``options`` dict of ``torch.compile``
(``to_options`` / ``from_options``), and the seeds' ``OPENPI_BITBLAS_*`` environment variables
(``from_env``) so existing openpi run scripts keep working.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .config_checks import (ConfigError, check_bool, check_float_weights, check_inductor_options, check_int,
                            check_int_tuple, check_optional_path, check_packs)
from .attention_support import ATTENTION_CHOICES
from .kernel_support import KERNELS
from .schemes import check_rules, check_scheme, effective_group_size, scheme_for

log = logging.getLogger("quantvla_fx")

# The seeds' layer selection: the GeGLU MLP linears of the PaliGemma LM and the action expert.
PI05_MLP_INCLUDE = (
    r"(.*language_model.*(gate_proj|up_proj|down_proj).*|.*gemma_expert.*(gate_proj|up_proj|down_proj).*)",
)
PI05_EXCLUDE = (r"(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower)(?:\.|$)",)

EPILOGUES = ("auto", "fused", "int32")
LOWERINGS = ("inductor", "eager")

_ENV_PREFIX = "OPENPI_BITBLAS_"


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a regex string or a sequence of them, got {type(value).__name__}") from None
    for v in items:
        if not isinstance(v, str):
            raise ConfigError(f"{name} must contain regex strings, got {v!r}")
    return items


@dataclass(frozen=True)
class QuantVLAConfig:
    """What the ``quantvla`` backend quantizes and how.

    Attributes:
        include: regexes searched (``re.search``) in the FQN of the module that *calls* each
            linear; a linear is a candidate if any matches.
        exclude: regexes that veto a candidate (checked after ``include``).
        weight_bits / act_bits: 4 and 8; weight-only int4 is ``scheme="w4a16"``, not ``act_bits``.
        group_size: the ``w4a8`` weight group: -1 for one weight scale per output channel, or a
            positive even group size (a group as wide as K or wider is one group per row).
        scheme: what every selected linear becomes unless a ``layer_schemes`` rule says otherwise:
            ``w4a8`` (int4 weights × int8 per-token activations) or ``w4a16`` (int4 weights only,
            activations in the model's dtype, no activation quantization; the seeds' W4FP16).
        layer_schemes: per-layer schemes, ``{regex: "w4a8" | "w4a16" | "float"}`` (or a sequence of
            pairs), searched in the calling module's FQN among the selected linears; rules must
            not overlap (a linear two rules match is an error naming both). schemes.py.
        w4a16_group_size: the ``w4a16`` weight group (default 128, as the seeds' W4FP16 script;
            -1 per output channel).
        kernel: ``auto`` (fastest verified kernel per shape; the reference kernel on CPU),
            ``reference``, ``bitblas`` or ``triton``.
        epilogue: ``fused`` (scales applied in the kernel: ``quantvla::w4a8_linear``), ``int32``
            (``quantvla::w4a8_mm`` + the dequant epilogue as aten ops Inductor fuses with what
            follows) or ``auto``.
        packs: DuQuant packs (a ``quantvla_fx.duquant.Packs`` or a path to a pack file/folder);
            None = round-to-nearest.
        dump_dir: write graph dumps and the rewrite report here.
        enable_tuning / opt_m: BitBLAS tuning switches (``OPENPI_BITBLAS_ENABLE_TUNING``/``OPT_M``).
        debug: log every linear's decision at INFO instead of DEBUG.
        quantize: False keeps weights and activations in float but applies every DuQuant
            transform and fold (a check that the transforms are exact; not for deployment).
        duquant_fold: fold DuQuant smoothing into the producing op where exact (False: online).
        lowering: ``inductor`` (default) or ``eager``: run the rewritten FX graph as Python, to
            tell a rewrite bug from an Inductor bug.
        verify_weights: compare the content of every quantized weight on every call and re-pack
            when it changed (catches edits that bypass the version counter, e.g. ``w.data.copy_``
            or a NumPy view; costs a pass over the weights per call).
        inductor_options: ``torch._inductor.config`` settings for this compile (checked by name).
        compile_regions: lower each distinct repeated layer once (regions.py): the rewritten
            graph is cut at the boundaries of ``...layers.<i>`` modules and runs with the same
            structure and input shapes share one Inductor lowering (golden tiny Pi0.5: its 20
            expert-layer runs, 10 steps x 2 layers, share 2). Shorter cold compiles; no fusion
            across a cut; with CUDA graphs not yet measured on a GPU. Default False.
        cudagraphs: run the compiled graph through CUDA graphs (what ``mode="reduce-overhead"``
            gives; ``mode`` cannot be combined with ``options``).
        float_weights: what happens to a quantized linear's float weight once its packs exist
            (float_weights.py): ``offload`` (to pinned CPU memory, the source of truth for
            re-packing; the module still runs eagerly), ``drop`` (freed; the layer runs only
            compiled), ``keep`` (stays on its device) or ``auto`` (default: ``offload`` for weights
            on a GPU, ``keep`` on the CPU and with ``verify_weights`` or ``quantize=False``).
        attention: ``auto`` (rewrite provable key-padding SDPA calls into ``quantvla::attention``,
            kernel chosen per call: PyTorch's fused SDPA without padding, split-KV otherwise),
            ``reference`` / ``splitkv`` / ``flash`` / ``torch`` (force a kernel), or
            ``sdpa`` (leave every SDPA call as it is). Independent of ``quantize``.
    """

    include: tuple[str, ...] = PI05_MLP_INCLUDE
    exclude: tuple[str, ...] = PI05_EXCLUDE
    weight_bits: int = 4
    act_bits: int = 8
    group_size: int = -1
    kernel: str = "auto"
    epilogue: str = "auto"
    packs: Any = None
    dump_dir: Optional[str] = None
    enable_tuning: bool = False
    opt_m: tuple[int, ...] = ()
    debug: bool = False
    lowering: str = "inductor"
    quantize: bool = True
    duquant_fold: bool = True
    verify_weights: bool = False
    inductor_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    cudagraphs: bool = False
    compile_regions: bool = False
    float_weights: str = "auto"
    attention: str = "auto"
    scheme: str = "w4a8"
    layer_schemes: tuple = ()
    w4a16_group_size: int = 128
    _include_re: tuple = field(default=(), init=False, repr=False, compare=False)
    _exclude_re: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("include", _as_tuple(self.include, "include"))
        set_("exclude", _as_tuple(self.exclude, "exclude"))
        set_("_include_re", tuple(_compile(p, "include") for p in self.include))
        set_("_exclude_re", tuple(_compile(p, "exclude") for p in self.exclude))
        for name in ("enable_tuning", "debug", "quantize", "duquant_fold", "verify_weights", "cudagraphs",
                     "compile_regions"):
            check_bool(name, getattr(self, name))
        for name in ("weight_bits", "act_bits", "group_size", "w4a16_group_size"):
            check_int(name, getattr(self, name))
        check_scheme("scheme", self.scheme)
        set_("layer_schemes", check_rules(self.layer_schemes))
        set_("opt_m", check_int_tuple("opt_m", self.opt_m))
        set_("dump_dir", check_optional_path("dump_dir", self.dump_dir))
        set_("packs", check_packs(self.packs))
        set_("inductor_options", check_inductor_options(self.inductor_options))
        check_float_weights(self.float_weights, self.quantize, self.verify_weights)
        if self.weight_bits != 4:
            raise ConfigError(f"weight_bits={self.weight_bits!r}: only 4-bit weights are implemented")
        if self.act_bits == 16:
            raise ConfigError("act_bits=16: weight-only int4 is scheme='w4a16' (act_bits is the W4A8 activation width)")
        if self.act_bits != 8:
            raise ConfigError(f"act_bits={self.act_bits!r}: only 8-bit activations are implemented")
        for name in ("group_size", "w4a16_group_size"):
            g = getattr(self, name)
            if not (g == -1 or (g > 0 and g % 2 == 0)):
                raise ConfigError(f"{name}={g!r}: use -1 (per output channel) or a positive even integer")
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel={self.kernel!r}: choose one of {KERNELS}")
        if self.epilogue not in EPILOGUES:
            raise ConfigError(f"epilogue={self.epilogue!r}: choose one of {EPILOGUES}")
        if self.epilogue == "int32" and self.group_size > 0:
            raise ConfigError(f"epilogue='int32' with group_size={self.group_size}: one int32 accumulator per output "
                              "cannot take per-group weight scales; use epilogue='fused' (or 'auto') or group_size=-1")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"attention={self.attention!r}: choose one of {ATTENTION_CHOICES}")
        if self.lowering not in LOWERINGS:
            raise ConfigError(f"lowering={self.lowering!r}: choose one of {LOWERINGS}")

    # -- selection -------------------------------------------------------------------------
    def match(self, fqn: str) -> tuple[bool, str]:
        """(selected, reason) for the module FQN that calls a linear."""
        inc = next((p for p, r in zip(self.include, self._include_re) if r.search(fqn)), None)
        if inc is None:
            return False, "matches no include rule"
        exc = next((p for p, r in zip(self.exclude, self._exclude_re) if r.search(fqn)), None)
        if exc is not None:
            return False, f"excluded by {exc!r}"
        return True, f"included by {inc!r}"

    def scheme_for(self, fqn: str) -> tuple[str, str]:
        """(scheme, why) of a selected linear: a ``layer_schemes`` rule's, else ``scheme``.
        Raises ConfigError naming the layer and the rules when two rules match it."""
        scheme, rule = scheme_for(fqn, self.layer_schemes, self.scheme)
        return scheme, (f"layer_schemes {rule!r}" if rule is not None else "scheme")

    def group_size_for(self, scheme: str, k: int) -> int:
        """The weight group of a K-wide linear under ``scheme`` (-1: one scale per output channel)."""
        return effective_group_size(k, self.w4a16_group_size if scheme == "w4a16" else self.group_size)

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def pi05_mlp(cls, **overrides) -> "QuantVLAConfig":
        """The seeds' selection: MLP gate/up/down of the PaliGemma LM and the action expert."""
        return cls(**overrides)

    @classmethod
    def all_linears(cls, **overrides) -> "QuantVLAConfig":
        """Every linear whose calling module is not a norm, embedding or vision tower."""
        return cls(**{"include": (r".*",), **overrides})

    # -- torch.compile options -------------------------------------------------------------
    def to_options(self) -> dict[str, Any]:
        """The ``options`` dict for ``torch.compile(..., backend="quantvla", options=...)``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def option_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]]) -> "QuantVLAConfig":
        if options is None:
            return cls()
        if isinstance(options, QuantVLAConfig):
            return options
        if not isinstance(options, Mapping):
            raise ConfigError(f"options must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - set(cls.option_keys()))
        if unknown:
            raise ConfigError(f"unknown quantvla option(s) {unknown}; valid keys: {list(cls.option_keys())}")
        return cls(**dict(options))

    def replace(self, **changes) -> "QuantVLAConfig":
        return dataclasses.replace(self, **changes)

    # -- environment -----------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> "QuantVLAConfig":
        """Read the seeds' ``OPENPI_BITBLAS_*`` variables (unset ones keep the defaults).

        INCLUDE, EXCLUDE (regexes), WBITS, GROUP_SIZE, DUQUANT_PACKDIR, ENABLE_TUNING (0/1),
        OPT_M ("1,16,32"), DEBUG (0/1), and KERNEL / DUMP_DIR (ours).  ENABLE is the seeds'
        W4FP16 switch: 1 gives ``scheme="w4a16"`` (GROUP_SIZE then sets ``w4a16_group_size``),
        0 quantizes nothing (their script runs the float model); unset keeps W4A8.
        """
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}

        def get(name):
            v = env.get(_ENV_PREFIX + name)
            return None if v is None or v.strip() == "" else v.strip()

        def as_int(name, v):
            try:
                return int(v)
            except ValueError:
                raise ConfigError(f"{_ENV_PREFIX}{name}={v!r} is not an integer") from None

        def as_bool(name, v):
            if v.lower() in ("1", "true", "yes", "on"):
                return True
            if v.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{_ENV_PREFIX}{name}={v!r} is not a boolean (use 0 or 1)")

        weight_only = False
        if (v := get("ENABLE")) is not None:
            weight_only = as_bool("ENABLE", v)
            kw["include"] = () if not weight_only else PI05_MLP_INCLUDE
            if weight_only:
                kw["scheme"] = "w4a16"
        if (v := get("INCLUDE")) is not None and kw.get("include", True) != ():
            kw["include"] = (v,)
        if (v := get("EXCLUDE")) is not None:
            kw["exclude"] = (v,)
        if (v := get("WBITS")) is not None:
            kw["weight_bits"] = as_int("WBITS", v)
        if (v := get("GROUP_SIZE")) is not None:
            kw["w4a16_group_size" if weight_only else "group_size"] = as_int("GROUP_SIZE", v)
        if (v := get("DUQUANT_PACKDIR")) is not None:
            kw["packs"] = v
        if (v := get("ENABLE_TUNING")) is not None:
            kw["enable_tuning"] = as_bool("ENABLE_TUNING", v)
        if (v := get("OPT_M")) is not None:
            kw["opt_m"] = tuple(as_int("OPT_M", p) for p in v.replace(" ", "").split(",") if p)
            if any(m <= 0 for m in kw["opt_m"]):
                raise ConfigError(f"{_ENV_PREFIX}OPT_M={v!r}: token counts must be positive")
        if (v := get("DEBUG")) is not None:
            kw["debug"] = as_bool("DEBUG", v)
        if (v := get("KERNEL")) is not None:
            kw["kernel"] = v
        if (v := get("DUMP_DIR")) is not None:
            kw["dump_dir"] = v
        kw.update(overrides)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"from {_ENV_PREFIX}* environment: {e}") from None


def _compile(pattern: str, field_name: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field_name} regex {pattern!r} is invalid: {e}") from None
