"""The bitblas kernel: clear refusals on CPU, its settings and compile rewrite; exactness on a GPU."""
import shutil

import pytest
import torch

from quantvla_fx import QuantVLAConfig, kernel_support
from quantvla_fx.models.pi05.config import Pi05Config
from quantvla_fx.kernels import verify
from quantvla_fx.kernels.bitblas import build as bitblas_build
from quantvla_fx.kernels.bitblas import env as bitblas_env
from quantvla_fx.kernels.bitblas import kernel as bb
from quantvla_fx.kernels.registry import get_kernel
from quantvla_fx.kernels.select import resolve_kernel
from quantvla_fx.kernel_support import KernelSettings, kernel_arg, parse_kernel_arg
from quantvla_fx.quant.int4_pack import pack_int4

CPU = torch.device("cpu")
PI05_SHAPES = list(Pi05Config.pi05_libero().mlp_gemm_shapes().values())  # (N, K) of the Pi0.5 MLP GEMMs
MS = [1, 10, 50, 968, 1024, 1500]


@pytest.fixture
def settings(monkeypatch):
    """Each test starts from an environment without the settings' variables and leaves none behind."""
    for var in ("OPENPI_BITBLAS_ENABLE_TUNING", "OPENPI_BITBLAS_OPT_M", "QUANTVLA_BITBLAS_CACHE", "QUANTVLA_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _kernel_settings(config: QuantVLAConfig) -> KernelSettings:
    """What the bitblas kernel of a compile with this config is built with (via the op's argument)."""
    name, kernel_settings = parse_kernel_arg(kernel_arg(config))
    assert name == config.kernel
    return kernel_settings


def test_registered_under_its_name():
    assert get_kernel("bitblas") is bb.KERNEL
    assert bb.KERNEL.name == "bitblas"


def test_cpu_is_refused_with_a_sentence():
    reason = bb.KERNEL.unavailable_reason(CPU)
    assert reason == "the bitblas kernel needs a CUDA device, got cpu."


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(kernel_support, "installed", lambda package: package != "bitblas")
    reason = bb.BitBLASKernel().unavailable_reason(torch.device("cuda"))
    assert reason == "bitblas is not installed (pip install quantvla-fx[bitblas])."


def test_resolve_on_cpu_raises_naming_bitblas_and_why():
    with pytest.raises(RuntimeError, match=r"'bitblas'.*needs a CUDA device"):
        resolve_kernel("bitblas", CPU, 2048, 2048, 16)


@pytest.mark.parametrize(
    "n,k,group,needle",
    [(64, 48, -1, "K=48 is not a multiple of 32"), (40, 64, -1, "N=40 is not a multiple of 16"),
     (64, 256, 128, "group_size=128")],
)
def test_shape_limits(n, k, group, needle):
    assert needle in bb.KERNEL.unsupported_reason(n, k, group, CPU)


def test_supported_shape_on_cpu_reports_the_device():
    assert "CUDA device" in bb.KERNEL.unsupported_reason(2048, 2048, -1, CPU)


def test_settings_from_env_and_configure(settings):
    s = _kernel_settings(QuantVLAConfig.from_env(kernel="bitblas"))
    assert bb.opt_m(s) == bb.DEFAULT_OPT_M and s.enable_tuning is False
    settings.setenv("OPENPI_BITBLAS_OPT_M", "64, 16,16,256")
    settings.setenv("OPENPI_BITBLAS_ENABLE_TUNING", "1")
    s = _kernel_settings(QuantVLAConfig.from_env(kernel="bitblas"))
    assert bb.opt_m(s) == (16, 64, 256) and s.enable_tuning is True
    s = _kernel_settings(QuantVLAConfig.from_env(kernel="bitblas", enable_tuning=False, opt_m=[32, 8]))
    assert bb.opt_m(s) == (8, 32) and s.enable_tuning is False
    # Each set of settings has its own kernel object (and operators): compiles do not share them.
    assert get_kernel("bitblas", s) is bb.kernel_for(KernelSettings(opt_m=(32, 8))) is not bb.KERNEL
    assert bb.kernel_for(s)._key(64, 64) == (64, 64, (8, 32), False)


@pytest.mark.parametrize("var,value", [("OPENPI_BITBLAS_OPT_M", "16,x"), ("OPENPI_BITBLAS_OPT_M", "0,16"),
                                       ("OPENPI_BITBLAS_ENABLE_TUNING", "maybe")])
def test_bad_env_values_name_the_variable(settings, var, value):
    settings.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        QuantVLAConfig.from_env(kernel="bitblas")


def test_cache_dir_env_and_default(settings, tmp_path):
    assert "quantvla_fx/bitblas" in bb.cache_dir()
    settings.setenv("QUANTVLA_BITBLAS_CACHE", str(tmp_path))
    assert bb.cache_dir() == str(tmp_path)


def test_wrapper_gencode_becomes_compute80_with_real_sass():
    cmd = ["nvcc", "--shared", "x.cu", "-lcuda", "-gencode", "arch=compute_90,code=sm_90", "-o", "x.so"]
    out, hits = bitblas_build.rewrite_gencode(cmd, 90)
    assert hits == 1
    assert out[5] == "arch=compute_80,code=[sm_90,compute_80]"
    assert out[:5] == cmd[:5] and out[6:] == cmd[6:]


def test_exact_check_catches_a_wrong_kernel():
    ref = get_kernel("reference")
    assert verify.check_mm(ref.mm, 32, 64, CPU, (1, 17)) is None
    off_by_one = lambda x, w: ref.mm(x, w) + (x.shape[0] == 17)  # noqa: E731  wrong at M=17 only
    assert "wrong results at M=17" in verify.check_mm(off_by_one, 32, 64, CPU, (1, 17))


def test_refused_operator_is_reported_and_not_rebuilt(settings):
    kern = bb.BitBLASKernel()
    calls = []

    def failing_build(key, device):
        calls.append(key)
        raise RuntimeError("self-check against the reference failed: wrong results at M=17")

    settings.setattr(kern, "unavailable_reason", lambda device: None)
    settings.setattr(kern, "_build_verified", failing_build)
    for _ in range(2):
        reason = kern.unsupported_reason(64, 64, -1, CPU)
        assert reason.startswith("bitblas N=64, K=64: self-check against the reference failed")
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="self-check"):
        kern.mm(torch.zeros(2, 64, dtype=torch.int8), torch.zeros(64, 32, dtype=torch.int8))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_nvrtc_shim_builds_and_exports_versioned_symbols(tmp_path):
    import ctypes

    path = bitblas_env._build_nvrtc_shim(str(tmp_path))
    assert path and path.endswith("libnvrtc.so.12")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    assert lib.nvrtcGetErrorString(0)  # forwards to the real nvrtc, or says it has none


# -- GPU ----------------------------------------------------------------------------------------
def _gpu_reason():
    if not torch.cuda.is_available():
        return "needs CUDA"
    return bb.KERNEL.unavailable_reason(torch.device("cuda"))


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k", PI05_SHAPES)
def test_exact_int32_on_pi05_shapes(n, k):
    dev = torch.device("cuda")
    ref = get_kernel("reference")
    w = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev))
    for m in MS:
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
        got = bb.KERNEL.mm(x, w)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got, ref.mm(x, w)), f"M={m}"


@pytest.mark.gpu
@gpu
def test_linear_epilogue_matches_reference():
    dev = torch.device("cuda")
    n, k, m = 1024, 4096, 37
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    w = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev))
    xs, ws, bias = torch.rand(m, 1, device=dev) / 100, torch.rand(n, device=dev) / 100, torch.randn(n, device=dev)
    got = bb.KERNEL.linear(x, xs, w, ws, bias, torch.float32)
    want = get_kernel("reference").linear(x, xs, w, ws, bias, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@gpu
def test_custom_op_runs_bitblas():
    import quantvla_fx.ops  # noqa: F401

    dev = torch.device("cuda")
    x = torch.randint(-128, 128, (3, 5, 1024), dtype=torch.int8, device=dev)
    w = pack_int4(torch.randint(-8, 8, (4096, 1024), dtype=torch.int8, device=dev))
    got = torch.ops.quantvla.w4a8_mm(x, w, "bitblas")
    assert torch.equal(got, get_kernel("reference").mm(x.reshape(15, 1024), w).reshape(3, 5, 4096))
