"""The weights contract: a compile or call never uses packs of weights that have since changed.

Edits that bump no version counter (``.data``, a NumPy view, a parameter made under
``inference_mode``) are caught by the content digest at every new compile, by ``refresh`` and by
``verify_weights`` during a compiled function's life.  A pack file re-saved to the same path is
reloaded at the next compile.
"""
import numpy as np
import pytest
import torch

import quantvla_fx
from quantvla_fx import QuantVLAConfig

OPTS = QuantVLAConfig.all_linears(lowering="eager").to_options()


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()


def fresh(m, x, **over):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(m, backend="quantvla", options={**OPTS, **over})(x)


def float_out(m, x):
    with torch.no_grad():
        return m(x)


def agree(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95  # W4A8 noise ~0.99; a stale pack is far off


EDITS = {
    "data_copy": lambda w: w.data.copy_(torch.randn_like(w)),
    "data_mul": lambda w: w.data.mul_(-1.0),
    "numpy_view": lambda w: np.copyto(w.detach().numpy(), -w.detach().numpy()),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edit_no_counter_sees_is_picked_up_by_a_new_compile(edit):
    m, x = model(), torch.randn(4, 64)
    fresh(m, x)
    w = m[0].weight
    v = w._version
    EDITS[edit](w)
    assert w._version == v  # the premise: nothing told torch the weight changed
    assert agree(fresh(m, x), float_out(m, x))


def test_parameter_made_under_inference_mode():
    with torch.inference_mode():
        m = model(1)
    x = torch.randn(4, 64)
    fresh(m, x)
    with torch.inference_mode():
        m[0].weight.mul_(-1.0)
    assert agree(fresh(m, x), float_out(m, x))


def test_refresh_repacks_a_live_compiled_function():
    m, x = model(2), torch.randn(4, 64)
    fn = torch.compile(m, backend="quantvla", options=OPTS)
    with torch.no_grad():
        fn(x)
        m[0].weight.data.mul_(-1.0)
        stale = fn(x)
        assert not agree(stale, float_out(m, x))  # documented: refresh() or verify_weights needed
        assert quantvla_fx.refresh(fn) > 0
        got = fn(x)
    assert agree(got, float_out(m, x)) and torch.equal(got, fresh(m, x))


def test_refresh_accepts_bound_methods_tensors_and_nothing():
    m = model(3)
    fresh(m, torch.randn(2, 64))
    assert quantvla_fx.refresh(m.forward) >= 1
    fresh(m, torch.randn(2, 64))
    assert quantvla_fx.refresh(m[2].weight) == 1
    assert quantvla_fx.refresh() >= 1
    with pytest.raises(TypeError, match="quantvla_fx.refresh: expected a module"):
        quantvla_fx.refresh("model")


def test_verify_weights_checks_content_on_every_call():
    m, x = model(4), torch.randn(4, 64)
    fn = torch.compile(m, backend="quantvla", options={**OPTS, "verify_weights": True})
    with torch.no_grad():
        fn(x)
        m[2].weight.data.mul_(-1.0)
        got = fn(x)
    assert agree(got, float_out(m, x)) and torch.equal(got, fresh(m, x))


def test_pack_file_resaved_to_the_same_path_is_reloaded(tmp_path):
    from quantvla_fx import calibrate

    m, x = model(5), torch.randn(8, 64)
    cfg = QuantVLAConfig.all_linears(lowering="eager")
    path = str(tmp_path / "packs.safetensors")
    calibrate(m, [x], cfg, alpha=0.5, block_size=16, progress=False, search=False).save(path)
    first = fresh(m, x, packs=path)
    calibrate(m, [x], cfg, alpha=0.5, block_size=16, seed=7, progress=False, search=False).save(path)
    second = fresh(m, x, packs=path)
    want = fresh(m, x, packs=quantvla_fx.duquant.load_packs(path))
    assert torch.equal(second, want) and not torch.equal(first, second)
