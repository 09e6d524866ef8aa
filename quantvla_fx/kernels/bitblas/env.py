"""Make ``import bitblas`` (0.1.0.post1) work in this process, without wrapper scripts.

BitBLAS's ``libtvm.so`` links ``libcudart.so.12`` and ``libnvrtc.so.12`` with versioned symbols.
A CUDA-13 PyTorch provides neither, so before the import we load them ``RTLD_GLOBAL`` (the dynamic
linker then satisfies libtvm's DT_NEEDED entries by soname):

* ``libcudart.so.12`` from the ``nvidia-cuda-runtime-cu12`` wheel (or any directory listed in
  ``QUANTVLA_CUDA12_LIB_DIRS``, ``LD_LIBRARY_PATH`` or a CUDA 12 install);
* ``libnvrtc.so.12`` from ``nvidia-cuda-nvrtc-cu12`` when installed, else a 16 KB shim built here
  with the system C compiler that forwards to the process's newer libnvrtc.  BitBLAS compiles
  with nvcc; nvrtc is only linked, so the shim just has to resolve.

BitBLAS also runs a plain ``nvcc``, so its directory must be on ``PATH``.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("quantvla_fx")

_ENV_LIB_DIRS = "QUANTVLA_CUDA12_LIB_DIRS"
# What prepare() found, for logs and benchmarks/bitblas_check.py.
INFO: dict[str, Optional[str]] = {}
_PREPARED: Optional[tuple[Optional[str]]] = None

_NVRTC_SHIM_C = r"""
#include <dlfcn.h>
#include <stdio.h>
static void *h;
static void *sym(const char *n) {
  if (!h) { h = dlopen(TARGET, RTLD_NOW | RTLD_GLOBAL);
            if (!h) { fprintf(stderr, "quantvla nvrtc shim: %s\n", dlerror()); return NULL; } }
  return dlsym(h, n);
}
typedef int (*fn6)(void *, void *, void *, void *, void *, void *);
#define FWD(name) int name(void *a, void *b, void *c, void *d, void *e, void *f) { \
  fn6 p = (fn6)sym(#name); return p ? p(a, b, c, d, e, f) : 11; }
FWD(nvrtcCompileProgram) FWD(nvrtcCreateProgram) FWD(nvrtcDestroyProgram) FWD(nvrtcGetPTX)
FWD(nvrtcGetPTXSize) FWD(nvrtcGetProgramLog) FWD(nvrtcGetProgramLogSize)
const char *nvrtcGetErrorString(int r) {
  const char *(*p)(int) = (const char *(*)(int))sym("nvrtcGetErrorString");
  return p ? p(r) : "quantvla nvrtc shim: no libnvrtc to forward to";
}
"""


def _nvidia_wheel_dirs(subdir: str) -> list[str]:
    """``<site>/nvidia/<subdir>/lib`` for every place the nvidia-* wheels may be installed."""
    roots = list(sys.path)
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += [str(Path(p).parent) for p in spec.submodule_search_locations]
    return [os.path.join(r, "nvidia", subdir, "lib") for r in roots if r]


def _search_dirs(subdir: str) -> list[str]:
    dirs = [d for d in os.environ.get(_ENV_LIB_DIRS, "").split(os.pathsep) if d]
    dirs += _nvidia_wheel_dirs(subdir)
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    dirs += sorted(glob.glob("/usr/local/cuda-12*/lib64"), reverse=True)
    seen: list[str] = []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.append(d)
    return seen


def _mapped_path(soname: str) -> str:
    """Which file the loader used for ``soname`` (for the logs); the soname if unknown."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith(soname):
                    return path
    except OSError:
        pass
    return soname


def _load_global(soname: str, subdir: str) -> Optional[str]:
    """Load ``soname`` RTLD_GLOBAL; the path it came from, or None if it is nowhere."""
    try:
        ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
        return _mapped_path(soname)  # already loaded, or on the loader's path
    except OSError:
        pass
    for d in _search_dirs(subdir):
        path = os.path.join(d, soname)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError as e:
                log.debug("cannot load %s: %s", path, e)
    return None


def _newest_nvrtc() -> str:
    """Path of the process's own libnvrtc (CUDA 13+) for the shim to forward to."""
    dirs = _nvidia_wheel_dirs("cu13") + _nvidia_wheel_dirs("cuda_nvrtc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            dirs.append(os.path.join(home, "lib64"))
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, "libnvrtc.so.1[3-9]*")))
        if hits:
            return hits[0]
    return "libnvrtc.so.13"


def _build_nvrtc_shim(cache_dir: str) -> Optional[str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out_dir = Path(cache_dir) / "nvrtc12_shim"
    lib = out_dir / "libnvrtc.so.12"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        src, vmap = out_dir / "shim.c", out_dir / "shim.map"
        src.write_text(f'#define TARGET "{_newest_nvrtc()}"\n' + _NVRTC_SHIM_C)
        # Same symbol version as the real library: libtvm asks for nvrtc*@libnvrtc.so.12.
        vmap.write_text("libnvrtc.so.12 { global: nvrtc*; local: *; };\n")
        tmp = out_dir / f"libnvrtc.so.12.{os.getpid()}"
        cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), f"-Wl,--version-script={vmap}",
               "-Wl,-soname,libnvrtc.so.12", "-ldl"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log.warning("building the libnvrtc.so.12 shim failed: %s", res.stderr.strip()[-500:])
            return None
        os.replace(tmp, lib)  # atomic: a parallel process never loads a half-written file
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return str(lib)


def _ensure_nvcc() -> Optional[str]:
    """BitBLAS and TileLang call a bare ``nvcc``: put the toolkit's bin directory on PATH."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            os.environ["PATH"] = os.path.join(home, "bin") + os.pathsep + os.environ.get("PATH", "")
            return os.path.join(home, "bin", "nvcc")
    return None


def prepare(cache_dir: str) -> Optional[str]:
    """Set up the process for ``import bitblas``; None when ready, else a sentence saying why not."""
    global _PREPARED
    if _PREPARED is not None:
        return _PREPARED[0]
    import torch

    reason = None
    nvcc = _ensure_nvcc()
    INFO["nvcc"] = nvcc
    INFO["torch_cuda"] = torch.version.cuda
    if nvcc is None:
        reason = ("bitblas compiles its kernels with nvcc, which is neither on PATH nor under "
                  "CUDA_HOME/CUDA_PATH or /usr/local/cuda; install the CUDA toolkit or set CUDA_HOME.")
    elif torch.version.cuda is None:
        reason = "this PyTorch build has no CUDA support, which the bitblas kernel needs."
    else:
        INFO["libcudart.so.12"] = _load_global("libcudart.so.12", "cuda_runtime")
        if INFO["libcudart.so.12"] is None:
            reason = (f"bitblas 0.1.0.post1 needs the CUDA 12 runtime (libcudart.so.12), but this "
                      f"process runs CUDA {torch.version.cuda} and none was found: "
                      f"pip install nvidia-cuda-runtime-cu12 (or list its folder in {_ENV_LIB_DIRS}).")
        else:
            nvrtc = _load_global("libnvrtc.so.12", "cuda_nvrtc") or _build_nvrtc_shim(cache_dir)
            INFO["libnvrtc.so.12"] = nvrtc
            if nvrtc is None:
                reason = ("bitblas 0.1.0.post1 links libnvrtc.so.12, which was not found and no C "
                          "compiler was available to build a forwarding shim: "
                          "pip install nvidia-cuda-nvrtc-cu12.")
    if reason is None:
        log.debug("bitblas environment ready: %s", INFO)
    _PREPARED = (reason,)
    return reason


def import_bitblas(cache_dir: str):
    """``import bitblas`` after :func:`prepare`; raises RuntimeError with a readable reason."""
    reason = prepare(cache_dir)
    if reason is not None:
        raise RuntimeError(reason)
    try:
        import bitblas  # noqa: F401  (rewrites sys.path: puts its bundled tvm/tilelang first)
    except Exception as e:
        raise RuntimeError(f"import bitblas failed: {type(e).__name__}: {str(e)[-400:]}") from e
    return bitblas
