"""Packed weights are graph inputs looked up per call: no instance or edit ever sees stale packs."""
import glob
import os

import torch

from quantvla_fx import QuantVLAConfig
from quantvla_fx.testing import ToyGemma, init_toy_gemma

OPTS = QuantVLAConfig.all_linears().to_options()


def reference_w4a8(model, x):
    """The same model quantized eagerly by the rewrite (no Inductor, no shared compiled graph)."""
    torch._dynamo.reset()
    out = torch.compile(model, backend="quantvla", options={**OPTS, "lowering": "eager"})(x)
    torch._dynamo.reset()
    return out


def test_two_instances_share_a_graph_but_not_weights():
    a = init_toy_gemma(ToyGemma(), seed=1).eval()
    b = init_toy_gemma(ToyGemma(), seed=2).eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        want_a, want_b = reference_w4a8(a, x), reference_w4a8(b, x)
        fn = torch.compile(lambda m, t: m(t), backend="quantvla", options=OPTS)
        got_a, got_b = fn(a, x), fn(b, x)
    assert torch.allclose(got_a, want_a, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_b, want_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_a, got_b, atol=1e-2)


def test_in_place_weight_edit_is_picked_up():
    m = init_toy_gemma(ToyGemma(), seed=3).eval()
    x = torch.randn(1, 8, 64)
    fn = torch.compile(m, backend="quantvla", options=OPTS)
    with torch.no_grad():
        before = fn(x)
        m.layers[0].mlp.up_proj.weight.mul_(-0.5)
        after = fn(x)
        m.layers[1].self_attn.q_proj.weight.data = torch.randn(64, 64) / 8  # storage swap, same Parameter
        swapped = fn(x)
        want_after_swap = reference_w4a8(m, x)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(swapped, want_after_swap, rtol=1e-5, atol=1e-5)


def test_graph_break_inside_layer_loop_keeps_each_layers_weights():
    m = init_toy_gemma(ToyGemma(layers=3, graph_break_in_loop=True), seed=4).eval()
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        got = torch.compile(m, backend="quantvla", options=OPTS)(x)
        m.graph_break_in_loop = False
        want = reference_w4a8(m, x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dynamic_token_count_does_not_recompile():
    from torch._dynamo.utils import counters

    m = init_toy_gemma(ToyGemma(layers=1), seed=5).eval()
    fn = torch.compile(m, backend="quantvla", options=OPTS)
    counters.clear()
    with torch.no_grad():
        for t in [2, 3, 5, 8, 13, 21, 34, 55, 89, 100, 128, 200, 256, 300, 400, 512, 640, 800, 1000, 1024]:
            x = torch.randn(1, t, 64)
            torch._dynamo.mark_dynamic(x, 1)
            assert fn(x).shape == (1, t, 64)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        # M = 1 is Dynamo's own 0/1 specialization (a plain torch.compile does the same): one more
        # static graph, after which every M is served without recompiling.
        for t in [1, 7, 1]:
            x = torch.randn(1, t, 64)
            torch._dynamo.mark_dynamic(x, 1) if t > 1 else None
            fn(x)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


class Twice(torch.nn.Module):
    """One linear called at two sites (like the unrolled denoise steps of Pi0.5)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.proj(torch.tanh(self.proj(x)))


def test_a_weight_used_at_several_sites_is_packed_once(tmp_path):
    m = Twice().eval()
    x = torch.randn(3, 32)
    dump = str(tmp_path)
    fn = torch.compile(m, backend="quantvla", options={**OPTS, "lowering": "eager", "dump_dir": dump})
    with torch.no_grad():
        fn(x)
    from quantvla_fx.backend import report_book

    rep = report_book(dump).graphs[-1]
    assert len(rep.quantized) == 2
    # Both call sites read one packed weight and one scale: a single derived-input pair.
    (path,) = glob.glob(os.path.join(dump, "graph_%03d" % rep.graph, "*_substitute_ops.py"))
    code = open(path).read()
    assert code.count("qv_proj_w4:") == 1 and "qv_proj_w4_1" not in code
