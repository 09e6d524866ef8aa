"""Build BitBLAS 0.1.0.post1 int8×int4→int32 operators for the GPU in hand, and cache them.

On Hopper and newer, BitBLAS's own sm_90 path does not build (TileLang's WarpSpecializedPipeline
is missing from its bundled library; the wgmma templates fail with ``warpgroup_wait``).  Its
Ampere path (target ``nvidia/nvidia-a100``: mma.sync, ldmatrix, cp.async) is exact there, provided
every piece of generated CUDA is compiled as **compute_80** code, which ptxas then turns into SASS
for the real GPU.  Three places compile CUDA; we take over each of them in-process:

* ``tilelang_callback_cuda_compile``: the device module of BitBLAS's default "tl" backend;
* ``tvm_callback_cuda_compile``: the device module of its "tir" backend;
* ``LibraryGenerator.compile_lib``: the ctypes wrapper .so that actually runs (it hard-codes
  ``-gencode arch=compute_<gpu>,code=sm_<gpu>``; compute_90 would select the wgmma templates).
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from typing import Optional

log = logging.getLogger("quantvla_fx")

# The virtual architecture whose code BitBLAS's Ampere scheduler emits.
PTX_ARCH = 80
AMPERE_TARGET = "nvidia/nvidia-a100"
# How often each override ran (benchmarks/bitblas_check.py reports it as proof of use).
COMPILE_CALLS = {"tilelang_device": 0, "tvm_device": 0, "wrapper_so": 0}
_INSTALLED_SM: Optional[int] = None
_GENCODE_RE = re.compile(r"arch=compute_\d+a?,code=sm_\d+a?")


def needs_ampere_path(sm: int) -> bool:
    return sm >= 90


def target_for(sm: int, bitblas) -> str:
    """The BitBLAS target: its Ampere path on Hopper+, its own detection on older GPUs."""
    return AMPERE_TARGET if needs_ampere_path(sm) else bitblas.auto_detect_nvidia_target()


def rewrite_gencode(command: list, sm: int) -> tuple[list, int]:
    """``-gencode arch=compute_X,code=sm_X`` -> compute_80 code as sm_<sm> SASS plus compute_80 PTX."""
    out, hits = [], 0
    for arg in command:
        if isinstance(arg, str) and _GENCODE_RE.fullmatch(arg):
            arg, hits = f"arch=compute_{PTX_ARCH},code=[sm_{sm},compute_{PTX_ARCH}]", hits + 1
        out.append(arg)
    return out, hits


class _WrapperCompile:
    """Stands in for the ``subprocess`` module inside ``bitblas.builder.lib_generator``."""

    def __init__(self, sm: int):
        self._sm = sm

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, command, *args, **kwargs):
        command, hits = rewrite_gencode(list(command), self._sm)
        if hits:  # CUTLASS's headers trip CUDA 13's vector-type deprecations in every build
            command.append("-Xcompiler=-Wno-deprecated-declarations")
        if hits == 0 and command and os.path.basename(str(command[0])) == "nvcc":
            log.warning("bitblas wrapper compile has no -gencode to rewrite: %s", " ".join(map(str, command)))
        COMPILE_CALLS["wrapper_so"] += hits > 0
        return subprocess.run(command, *args, **kwargs)


def install_compile_overrides(sm: int) -> None:
    """Route BitBLAS's three CUDA compiles to compute_80 code with sm_<sm> SASS (idempotent)."""
    global _INSTALLED_SM
    if _INSTALLED_SM == sm:
        return
    import tvm
    import tilelang.contrib.nvcc as tl_nvcc
    import tilelang.engine.lower  # noqa: F401  registers the callback we replace; must come first
    import tvm.contrib.nvcc as tvm_nvcc  # noqa: F401  likewise (it registers without override)
    import bitblas.builder.lib_generator as lib_generator

    gencode = ["-gencode", f"arch=compute_{PTX_ARCH},code=sm_{sm}"]
    # .../3rdparty/tilelang (templates in src/); the package is .../3rdparty/tilelang/tilelang.
    tl_root = os.path.dirname(os.path.dirname(os.path.abspath(tilelang.__file__)))

    @tvm.register_func("tilelang_callback_cuda_compile", override=True)
    def _tilelang_compile(code, target):  # noqa: ARG001 (target is the A100 tag; we know better)
        COMPILE_CALLS["tilelang_device"] += 1
        templates = os.environ.get("TL_TEMPLATE_PATH") or os.path.join(tl_root, "src")
        cutlass = os.environ.get("TL_CUTLASS_PATH") or os.path.join(tl_root, "3rdparty", "cutlass", "include")
        opts = ["-std=c++17", "--use_fast_math", "-I" + templates, "-I" + cutlass]
        return tl_nvcc.compile_cuda(code, "cubin", gencode, options=opts)

    @tvm.register_func("tvm_callback_cuda_compile", override=True)
    def _tvm_compile(code, target):  # noqa: ARG001
        COMPILE_CALLS["tvm_device"] += 1
        ptx = ["-gencode", f"arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"]
        return tvm_nvcc.compile_cuda(code, target_format="fatbin", arch=gencode + ptx)

    lib_generator.subprocess = _WrapperCompile(sm)
    _INSTALLED_SM = sm
    log.debug("bitblas: CUDA compiles now emit compute_%d code with sm_%d SASS", PTX_ARCH, sm)


def matmul_config(bitblas, n: int, k: int, opt_m: tuple[int, ...]):
    """The one configuration we use: exact int32 products, plain [N, K/2] weights, dynamic M."""
    return bitblas.MatmulConfig(
        M=list(opt_m), N=n, K=k, A_dtype="int8", W_dtype="int4", accum_dtype="int32",
        out_dtype="int32", layout="nt", with_bias=False, group_size=-1, with_scaling=False,
        with_zeros=False, propagate_a=False, propagate_b=False,
    )


class OperatorStore:
    """BitBLAS's on-disk operator database for one directory and target, loaded once."""

    def __init__(self, bitblas, db_dir: str, target: str):
        from bitblas.cache import OperatorCache

        self._cls = OperatorCache
        self.db_dir, self.target = db_dir, target
        self._loaded = OperatorCache()
        try:
            self._loaded.load_from_database(db_dir, target)
        except Exception as e:  # a stale or foreign entry must not stop us from building
            log.warning("bitblas: could not load operator cache %s (%s); building afresh", db_dir, e)
            self._loaded = OperatorCache()

    def get(self, config):
        return self._loaded.get(config)

    def save(self, config, op) -> None:
        one = self._cls()
        one.add(config, op)
        try:
            one.save_into_database(self.db_dir, self.target)
        except Exception as e:
            log.warning("bitblas: could not save operator to %s: %s", self.db_dir, e)

    def forget(self, config) -> None:
        """Drop a cached entry that failed verification, in memory and on disk."""
        import shutil
        from hashlib import sha256

        self._loaded.cache.pop(config, None)
        path = os.path.join(self.db_dir, self.target, sha256(repr(config).encode()).hexdigest())
        shutil.rmtree(path, ignore_errors=True)


def build_operator(bitblas, config, target: str, enable_tuning: bool):
    """A freshly built ``bitblas.Matmul``; raises RuntimeError with a readable reason."""
    try:
        op = bitblas.Matmul(config, target=target, enable_tuning=enable_tuning, backend="tl")
    except Exception as e:
        raise RuntimeError(f"bitblas build failed: {type(e).__name__}: {str(e)[-400:]}") from e
    if getattr(op, "lib", None) is None:
        raise RuntimeError("bitblas produced no kernel library (its CUDA compile failed; "
                           "bitblas.set_log_level('DEBUG') shows the compiler output)")
    return op
