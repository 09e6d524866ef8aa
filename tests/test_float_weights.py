"""float_weights: a quantized linear's float weight leaves its device once packed, and the weights
contract still holds (every edit path re-packs, or fails naming the layer; never a stale result).

On the CPU ``offload`` moves the values into a second CPU tensor (no memory is saved there: ``auto``
keeps CPU weights), which tests the same mechanism a GPU uses: the parameter keeps its metadata and
its storage is resized to 0 bytes.  Outputs are compared bit for bit with ``keep``: both use the same
packs, so anything but equality would be a stale or wrong pack.
"""
import copy

import pytest
import torch

import quantvla_fx
from quantvla_fx import ConfigError, QuantVLAConfig, QuantVLAWarning
from quantvla_fx import float_weights as fw
from quantvla_fx.derived_inputs import PACK_CACHE

OPTS = dict(include=(".*",), lowering="eager")


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()


def weights(m):
    return [m[0].weight, m[2].weight]


def compiled(m, dynamic=None, **over):
    torch._dynamo.reset()
    return torch.compile(m, backend="quantvla", dynamic=dynamic, options=QuantVLAConfig(**{**OPTS, **over}).to_options())


def keep_out(m, x, **over):
    """What a fresh compile that keeps the float weights gives (on a resident copy of ``m``)."""
    with torch.no_grad():
        return compiled(copy.deepcopy(m), float_weights="keep", **over)(x)


def call(fn, x):
    with torch.no_grad():
        return fn(x)


def test_offload_frees_the_float_storage_and_changes_no_result():
    m, x = model(), torch.randn(4, 64)
    want = keep_out(m, x)
    originals = [w.detach().clone() for w in weights(m)]
    meta = [(w.shape, w.stride(), w.dtype, w.device, w.requires_grad) for w in weights(m)]
    fn = compiled(m, float_weights="offload")
    got = call(fn, x)
    builds, entries, graphs = PACK_CACHE.builds, len(PACK_CACHE), torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(got, want)
    for w, orig, md in zip(weights(m), originals, meta):
        assert w.untyped_storage().nbytes() == 0 and fw.is_offloaded(w)
        assert (w.shape, w.stride(), w.dtype, w.device, w.requires_grad) == md  # what Dynamo guards on
        assert torch.equal(fw.cpu_copy(w), orig)
    assert all(b.untyped_storage().nbytes() > 0 for b in (m[0].bias, m[2].bias))  # the op reads the biases
    for _ in range(2):
        assert torch.equal(call(fn, x), want)
    assert (PACK_CACHE.builds, len(PACK_CACHE)) == (builds, entries)  # no re-pack from the freed storage
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile
    res = fw.resident_bytes(m)
    assert res["float"] == 4 * (64 + 32) and res["offloaded"] == 4 * (64 * 64 + 32 * 64)
    assert res["derived"] > 0 and res["total"] == res["float"] + res["derived"]


def test_inductor_never_reads_the_freed_weights():
    m, x = model(), torch.randn(4, 64)
    want = keep_out(m, x)  # the rewrite run eagerly: Inductor's fusions round a little differently
    fn = compiled(m, float_weights="offload", lowering="inductor")
    assert torch.allclose(call(fn, x), want, rtol=1e-4, atol=1e-5)
    assert all(fw.is_offloaded(w) for w in weights(m))
    assert torch.allclose(call(fn, x), want, rtol=1e-4, atol=1e-5)


def test_auto_and_keep_leave_cpu_weights_in_place():
    for mode in ("auto", "keep"):
        m, x = model(), torch.randn(4, 64)
        call(compiled(m, float_weights=mode), x)
        assert not any(fw.is_offloaded(w) for w in weights(m))
        assert all(w.untyped_storage().nbytes() > 0 for w in weights(m))


def test_auto_offloads_accelerator_weights_only():
    gpu_like = torch.empty(4, 4, device="meta")  # any non-CPU device
    assert fw.mode_for("auto", gpu_like) == "offload"
    assert fw.mode_for("auto", torch.empty(4, 4)) == "keep"
    assert fw.mode_for("auto", gpu_like, verify_weights=True) == "keep"
    assert fw.mode_for("auto", gpu_like, quantize=False) == "keep"
    assert fw.mode_for("drop", torch.empty(4, 4)) == "drop"


@pytest.mark.parametrize("bad, match", [
    (dict(float_weights="cpu"), r"float_weights='cpu': choose one of"),
    (dict(float_weights=True), r"float_weights=True: choose one of"),
    (dict(float_weights="offload", verify_weights=True), r"float_weights='offload' with verify_weights=True"),
    (dict(float_weights="drop", quantize=False), r"float_weights='drop' with quantize=False"),
])
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        QuantVLAConfig(**bad)
    with pytest.raises(ConfigError, match=match):
        QuantVLAConfig.from_options(bad)
    assert QuantVLAConfig().float_weights == "auto"


def _inplace_cpu_copy(m):
    fw.cpu_copy(m[0].weight).mul_(-1.0)  # bumps the copy's version


def _data_edit_then_refresh(m):
    fw.cpu_copy(m[2].weight).data.mul_(-1.0)  # no version counter sees this one
    quantvla_fx.refresh(m)


def _load_state_dict(m):
    m.load_state_dict({k: -v for k, v in m.state_dict().items()})


def _load_state_dict_assign(m):
    m.load_state_dict({k: -v.clone() for k, v in m.state_dict().items()}, assign=True)


def _replace_data(m):
    with torch.no_grad():
        m[0].weight.data = torch.randn(64, 64)


EDITS = {"cpu_copy in place": _inplace_cpu_copy, "cpu_copy .data + refresh": _data_edit_then_refresh,
         "load_state_dict": _load_state_dict, "load_state_dict(assign=True)": _load_state_dict_assign,
         "param.data = new": _replace_data}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_each_weight_edit_path_repacks(edit):
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, float_weights="offload")
    before = call(fn, x)
    EDITS[edit](m)
    got = call(fn, x)
    assert all(fw.is_offloaded(w) for w in weights(m))  # freed again once re-packed
    assert not torch.equal(got, before)
    assert torch.equal(got, keep_out(fw_restored(m), x))


def fw_restored(m):
    """A resident copy of ``m`` with the values its CPU copies hold (``m`` stays offloaded)."""
    c = model()
    c.load_state_dict(m.state_dict())  # state_dict of an offloaded model: the CPU copies
    return c


def test_eager_call_borrows_the_weights_and_changes_no_pack():
    m, x = model(), torch.randn(4, 64)
    ref = copy.deepcopy(m)
    fn = compiled(m, float_weights="offload")
    want = call(fn, x)
    builds = PACK_CACHE.builds
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))  # the float module, from the CPU copies
        with pytest.raises(RuntimeError):
            m(torch.randn(4, 7))  # a failing forward still gives the weights back
    assert all(fw.is_offloaded(w) for w in weights(m))
    assert torch.equal(call(fn, x), want) and PACK_CACHE.builds == builds


def test_drop_fails_naming_the_layer_wherever_float_is_needed():
    m, x = model(), torch.randn(4, 64)
    want = keep_out(m, x)
    fn = compiled(m, float_weights="drop")
    assert torch.equal(call(fn, x), want)
    assert all(fw.is_offloaded(w) for w in weights(m)) and fw.resident_bytes(m)["offloaded"] == 0
    with pytest.raises(RuntimeError, match=r"0\.weight: cannot run it in float: .*dropped"):
        m(x)
    with pytest.raises(RuntimeError, match=r"0\.weight: cannot save it in a state_dict"):
        m.state_dict()
    with pytest.raises(ValueError, match="dropped"):
        fw.cpu_copy(m[0].weight)
    with pytest.raises(RuntimeError, match=r"cannot restore 0\.weight, 2\.weight"):
        fw.restore(m)
    quantvla_fx.refresh(m)  # the packs are gone and cannot be rebuilt
    with pytest.raises(RuntimeError, match=r"0\.weight: cannot re-pack it"):
        call(fn, x)


def test_drop_then_load_state_dict_repacks_and_drops_again():
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, float_weights="drop")
    call(fn, x)
    new = model(seed=1)
    m.load_state_dict(new.state_dict())
    got = call(fn, x)
    assert all(fw.is_offloaded(w) for w in weights(m))
    assert torch.equal(got, keep_out(new, x))


def test_recompile_reads_the_cpu_copies_and_reuses_the_packs():
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, dynamic=False, float_weights="offload")
    call(fn, x)
    builds, graphs = PACK_CACHE.builds, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    x2 = torch.randn(3, 64)
    got = call(fn, x2)  # another shape: Dynamo compiles again, with the weights freed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert PACK_CACHE.builds == builds and all(fw.is_offloaded(w) for w in weights(m))
    assert torch.equal(got, keep_out(fw_restored(m), x2))


def test_drop_then_recompile_fails_naming_the_layer():
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, dynamic=False, float_weights="drop")
    call(fn, x)
    with pytest.raises(Exception, match=r"0\.weight: cannot compile a new graph that reads it"):
        call(fn, torch.randn(3, 64))


class ReadsWeightInFloat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight  # a float use (not weight-only: no derived input)


def test_a_weight_also_read_in_float_stays():
    torch.manual_seed(0)
    m, x = ReadsWeightInFloat().eval(), torch.randn(4, 64)
    call(compiled(m, float_weights="offload"), x)
    assert not fw.is_offloaded(m.lin.weight) and m.lin.weight.untyped_storage().nbytes() > 0


def test_a_later_graph_reading_the_weight_in_float_brings_it_back():
    m, x = model(), torch.randn(4, 64)
    want = keep_out(m, x)
    fn = compiled(m, float_weights="offload")
    call(fn, x)
    assert fw.is_offloaded(m[0].weight)
    with pytest.warns(QuantVLAWarning):  # nothing quantized: this graph reads m[0].weight in float
        g = torch.compile(lambda t: m[0](t), backend="quantvla", options={"include": ["^nothing$"]})
        float_first = call(g, x)
    assert not fw.is_offloaded(m[0].weight)
    with torch.no_grad():
        assert torch.equal(float_first, torch.nn.functional.linear(x, m[0].weight, m[0].bias))
    assert torch.equal(call(fn, x), want)
    assert not fw.is_offloaded(m[0].weight) and fw.is_offloaded(m[2].weight)  # kept for good


def test_restore_brings_the_weights_back_without_a_repack():
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, float_weights="offload")
    want = call(fn, x)
    builds = PACK_CACHE.builds
    copies = [fw.cpu_copy(w).clone() for w in weights(m)]
    assert fw.restore(m) == 2
    assert all(torch.equal(w.detach(), c) for w, c in zip(weights(m), copies))
    assert torch.equal(call(fn, x), want) and PACK_CACHE.builds == builds
    assert not any(fw.is_offloaded(w) for w in weights(m))  # keep=True: not freed again
    with torch.no_grad():
        m[0].weight.mul_(-1.0)  # a GPU-style in-place edit works again, and re-packs
    assert torch.equal(call(fn, x), keep_out(m, x))


def test_packs_are_shared_by_graphs_after_offload():
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, float_weights="offload")
    call(fn, x)
    # Count this model's packs only: entries of earlier tests' models leave the process-wide cache
    # whenever the garbage collector frees those models.
    mine = lambda: sorted(id(o) for o in PACK_CACHE.outputs_of(list(m.parameters()) + list(m.buffers())))
    entries, builds = mine(), PACK_CACHE.builds
    assert entries
    g = torch.compile(lambda t: m(t) * 2, backend="quantvla", options=QuantVLAConfig(**OPTS).to_options())
    call(g, x)
    call(fn, x)
    assert (mine(), PACK_CACHE.builds) == (entries, builds)


def test_calls_and_edits_under_inference_mode():
    m, x = model(), torch.randn(4, 64)
    fn = compiled(m, float_weights="offload")
    with torch.inference_mode():
        before = fn(x)
    _inplace_cpu_copy(m)  # the CPU copy was made outside inference mode: it has a version counter
    with torch.inference_mode():
        got, eager = fn(x), m(x)
    assert all(fw.is_offloaded(w) for w in weights(m)) and not torch.equal(got, before)
    resident = fw_restored(m)
    assert torch.equal(got, keep_out(resident, x))
    with torch.no_grad():
        assert torch.equal(eager, resident(x))


def test_parameters_made_under_inference_mode():
    with torch.inference_mode():
        m = model()
    x = torch.randn(4, 64)
    want = keep_out(fw_restored(m), x)
    fn = compiled(m, float_weights="offload")
    with torch.inference_mode():
        assert torch.equal(fn(x), want)
        assert all(fw.is_offloaded(w) for w in weights(m))
        assert torch.equal(m(x), fw_restored(m)(x))
        assert torch.equal(fn(x), want)


def test_a_weight_in_a_storage_that_cannot_resize_is_freed_too():
    m, x = model(), torch.randn(4, 64)
    with torch.no_grad():  # as a loader that maps a file gives it (torch.frombuffer: not resizable)
        w = m[0].weight.detach().numpy().tobytes()
        m[0].weight = torch.nn.Parameter(torch.frombuffer(bytearray(w), dtype=torch.float32).view(64, 64))
    assert not m[0].weight.untyped_storage().resizable()
    want = keep_out(m, x)
    fn = compiled(m, float_weights="offload")
    assert torch.equal(call(fn, x), want)
    assert fw.is_offloaded(m[0].weight) and torch.equal(call(fn, x), want)
    with torch.no_grad():
        assert torch.equal(m(x), fw_restored(m)(x))


def test_pi05_with_duquant_folds_frees_folded_norm_weights_too(golden_pi05_calibrated):
    """Every source of every derived input goes, not only linear weights: the Gemma norm weights the
    DuQuant smoothing folds into are read only through derived inputs."""
    from quantvla_fx.backend import report_book

    policy, obs, noise, packs = golden_pi05_calibrated

    torch._dynamo.reset()
    cfg = QuantVLAConfig.pi05_mlp(packs=packs, lowering="eager", float_weights="offload")
    fn = torch.compile(policy.sample_actions, backend="quantvla", options=cfg.to_options())
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
        try:
            first = fn(obs, noise=noise)  # packed from the resident weights, which are freed after it
            freed = [n for n, p in policy.named_parameters() if fw.is_offloaded(p)]
            again, eager = fn(obs, noise=noise), policy.sample_actions(obs, noise=noise)
        finally:
            fw.restore(policy, keep=False)  # the fixture is shared with other tests of this module
    assert torch.equal(again, first) and torch.equal(eager, ref)
    assert any(n.endswith("post_attention_layernorm.weight") for n in freed)
    quantized = {r.param_fqn.replace("._parameters.", ".") for r in report_book(None).graphs[-1].quantized}
    assert len(quantized) == 12 and quantized <= set(freed)  # every quantized linear's weight (2+2 layers × 3)
