"""``auto`` kernel selection: CPU goes to reference; only verified kernels win; the choice is cached."""
import json

import pytest
import torch

from quantvla_fx.kernels.registry import KernelRegistry, get_kernel
from quantvla_fx.kernels.select import Selector, resolve_kernel

CPU = torch.device("cpu")


class FakeKernel:
    """Delegates to the reference, optionally off by one, and counts its calls."""

    def __init__(self, name, wrong=False):
        self.name, self.wrong, self.calls = name, wrong, 0

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, n, k, group_size, device):
        return None

    def mm(self, x_q, w_packed):
        self.calls += 1
        return get_kernel("reference").mm(x_q, w_packed) + int(self.wrong)

    def linear(self, *args):
        return get_kernel("reference").linear(*args)


@pytest.fixture
def fakes(tmp_path):
    """Two fake kernels (fast-but-wrong, slower-but-exact) in a private registry and cache dir.

    ``new_process()`` gives a selector that shares only the disk (what another process sees).
    """
    reg = KernelRegistry()
    kernels = {"fast_wrong": FakeKernel("fast_wrong", wrong=True), "slow_right": FakeKernel("slow_right")}
    for k in kernels.values():
        reg.register(k)
    times = {"fast_wrong": 1.0, "slow_right": 5.0, "reference": 50.0}
    measured = []

    def fake_measure(kern, run, device):
        run()
        measured.append(kern.name)
        return times[kern.name]

    def new_process():
        return Selector(reg, ("fast_wrong", "slow_right", "reference"), fake_measure, cache_dir=tmp_path)

    kernels["times"] = times
    kernels["registry"] = reg
    kernels["new_process"] = new_process
    return new_process(), kernels, measured, tmp_path


def test_auto_on_cpu_is_reference():
    assert resolve_kernel("auto", CPU, 2048, 2048, 10) is get_kernel("reference")


def test_inexact_kernel_is_never_chosen_and_choice_is_cached(fakes):
    auto, kernels, measured, tmp_path = fakes
    chosen = auto.select(CPU, 64, 128, 16, -1)
    assert chosen is kernels["slow_right"]
    assert measured == ["slow_right", "reference"]  # the wrong one was not even timed

    (path,) = tmp_path.glob("auto_kernels_*.json")
    entry = json.loads(path.read_text())["entries"]["cpu|64|128|16|-1"]
    assert entry["kernel"] == "slow_right"
    assert entry["times_us"] == {"slow_right": 5.0, "reference": 50.0}
    assert "fast_wrong" in entry["skipped"]


def test_cache_is_reread_from_disk_without_measuring(fakes):
    auto, kernels, measured, _ = fakes
    auto.select(CPU, 64, 128, 16, -1)
    auto = kernels["new_process"]()  # a new process: nothing in memory
    measured.clear()
    assert auto.select(CPU, 64, 128, 16, -1) is kernels["slow_right"]
    assert measured == []


def test_cached_choice_that_turned_wrong_is_remeasured(fakes):
    auto, kernels, measured, _ = fakes
    auto.select(CPU, 64, 128, 16, -1)
    auto = kernels["new_process"]()  # nothing verified yet in this one
    kernels["slow_right"].wrong = True
    assert auto.select(CPU, 64, 128, 16, -1) is get_kernel("reference")


def test_new_kernel_available_triggers_a_new_measurement(fakes):
    auto, kernels, measured, _ = fakes
    auto.select(CPU, 64, 128, 16, -1)
    newcomer = kernels["registry"].register(FakeKernel("newcomer"))
    kernels["times"]["newcomer"] = 2.0
    auto.candidates = ("fast_wrong", "slow_right", "newcomer", "reference")
    measured.clear()
    assert auto.select(CPU, 64, 128, 16, -1) is newcomer
    assert measured == ["slow_right", "newcomer", "reference"]


def test_keys_separate_shapes_and_buckets(fakes):
    auto, _, measured, tmp_path = fakes
    auto.select(CPU, 64, 128, 16, -1)
    auto.select(CPU, 64, 128, 32, -1)
    auto.select(CPU, 64, 256, 16, 128)
    (path,) = tmp_path.glob("auto_kernels_*.json")
    keys = set(json.loads(path.read_text())["entries"])
    assert keys == {"cpu|64|128|16|-1", "cpu|64|128|32|-1", "cpu|64|256|16|128"}


def test_unloadable_candidate_is_skipped(fakes):
    auto, kernels, _, _ = fakes
    auto.candidates = ("does_not_exist", "slow_right", "reference")
    assert auto.select(CPU, 32, 64, 1, -1) is kernels["slow_right"]


def test_unreadable_cache_file_is_ignored(fakes):
    auto, kernels, _, tmp_path = fakes
    (tmp_path / "auto_kernels_cpu.json").write_text("{not json")
    assert auto.select(CPU, 32, 64, 1, -1) is kernels["slow_right"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_gpu_picks_a_verified_kernel(tmp_path):
    dev = torch.device("cuda")
    kern = Selector(cache_dir=tmp_path).select(dev, 4096, 1024, 16, -1)
    from quantvla_fx.quant.int4_pack import pack_int4

    x = torch.randint(-128, 128, (16, 1024), dtype=torch.int8, device=dev)
    w = pack_int4(torch.randint(-8, 8, (4096, 1024), dtype=torch.int8, device=dev))
    assert torch.equal(kern.mm(x, w), get_kernel("reference").mm(x, w))
    assert list(tmp_path.glob("auto_kernels_*.json"))
