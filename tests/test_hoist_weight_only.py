"""Subgraphs of weights and constants only are computed once, as derived inputs (hoist_weight_only)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantvla_fx import QuantVLAConfig, refresh
from quantvla_fx.backend import report_book
from quantvla_fx.derived_inputs import PACK_CACHE


class TimeConditioned(nn.Module):
    """Pi0.5's time path in miniature: a fixed schedule -> sinusoidal embedding -> MLP -> per-layer
    adaRMS-style modulation, applied to the input at every step."""

    def __init__(self, dim=32, layers=2, steps=3):
        super().__init__()
        self.steps = steps
        self.time_in = nn.Linear(dim, dim)
        self.time_out = nn.Linear(dim, dim)
        self.dense = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.norm_w = nn.Parameter(torch.randn(dim) * 0.1)  # (1 + w) is elementwise on a weight: not hoisted
        self.register_buffer("bias_t", torch.randn(dim, dim) * 0.1)  # .t() of it is a view: not hoisted

    def embed(self, t):
        half = self.time_in.in_features // 2
        freq = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        ang = t[:, None] * freq[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    def forward(self, x):
        t = torch.linspace(1.0, 0.1, self.steps)
        conds = F.silu(self.time_out(F.silu(self.time_in(self.embed(t)))))
        for step in range(self.steps):
            for dense, proj in zip(self.dense, self.proj):
                scale, shift = dense(conds[step]).chunk(2, dim=-1)
                h = x * (1 + self.norm_w) * (1 + scale) + shift
                x = x + proj(h) + h @ self.bias_t.t()
        return x


def _compile(model, **opts):
    config = QuantVLAConfig(include=[r"proj\.\d+|dense"], exclude=[], **opts)
    return torch.compile(model, backend="quantvla", options=config.to_options())


def _rewritten(model, x, **opts):
    import quantvla_fx.backend as backend

    seen = {}
    original = backend.rewrite

    def spy(gm, example_inputs, config):
        out = original(gm, example_inputs, config)
        seen["gm"] = out[0]
        return out

    backend.rewrite = spy
    try:
        with torch.no_grad():
            y = _compile(model, lowering="eager", **opts)(x)
    finally:
        backend.rewrite = original
    return y, seen["gm"]


def _count(gm, *names):
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method")
               and (getattr(n.target, "__name__", None) or str(n.target)) in names)


def test_time_path_leaves_the_graph_and_outputs_are_unchanged():
    torch.manual_seed(0)
    model = TimeConditioned().eval()
    x = torch.randn(4, 32)
    y, gm = _rewritten(model, x, quantize=False)
    with torch.no_grad():
        ref = model(x)
    assert float((y - ref).abs().max()) <= 1e-5
    # Left in the graph: the per-step projections (2 layers x 3 steps) and nothing of the time path.
    assert _count(gm, "linear") == 6
    assert _count(gm, "silu", "sin", "cos", "exp", "linspace", "arange", "chunk") == 0
    assert _count(gm, "t") == 6  # bias_t.t(): a view of a weight stays a view
    report = report_book(None).graphs[-1]
    (h,) = report.hoisted
    assert h["linears"] == 2 + 2 * 3 and h["outputs"] == 2 * 2 * 3
    assert h["bytes"] == 2 * 2 * 3 * 32 * 4  # scale and shift rows, fp32 (64-byte aligned already)
    records = {r.node: r for r in report.linears}
    dense = [r for r in records.values() if r.fqn.startswith("dense")]
    assert len(dense) == 6 and all(r.op.startswith("hoisted") and not r.quantized for r in dense)
    assert all(r.reason.startswith("hoisted") for r in dense)  # selected for W4A8, computed exactly instead
    assert sum(r.quantized for r in records.values()) == 6  # proj.* stay W4A8
    assert "Hoisted (weights and constants only" in report.to_markdown()


def test_inductor_matches_and_hoisted_weights_edits_are_seen():
    torch.manual_seed(0)
    model = TimeConditioned().eval()
    x = torch.randn(4, 32)
    fn = _compile(model, quantize=False)
    with torch.no_grad():
        assert float((fn(x) - model(x)).abs().max()) <= 1e-5
        builds = PACK_CACHE.builds
        model.time_out.weight.mul_(0.5)  # in place: the version counter moves
        assert float((fn(x) - model(x)).abs().max()) <= 1e-5
        assert PACK_CACHE.builds > builds
        model.load_state_dict({**model.state_dict(), "dense.1.bias": torch.randn(64)})  # copy_ into the bias
        assert float((fn(x) - model(x)).abs().max()) <= 1e-5
        model.dense[0].weight.data.copy_(torch.randn(64, 32))  # through .data: no version bump ...
        refresh(model)  # ... so the user says so
        assert float((fn(x) - model(x)).abs().max()) <= 1e-5


def test_plain_model_nothing_to_hoist_keeps_its_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = torch.compile(model, backend="quantvla", options=QuantVLAConfig(include=[".*"], exclude=[]).to_options())(x)
    assert report_book(None).graphs[-1].hoisted == []
    assert y.shape == (3, 8)


class Randomised(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        noise = torch.randn(8, 8) * self.w.sum()  # random: never computed once (w.sum() is)
        m = (self.w @ self.w).sum(0)  # weight-only compute, small output: hoisted
        return x @ noise + m


def test_random_ops_and_graph_outputs_are_not_hoisted():
    model = Randomised().eval()
    x = torch.randn(2, 8)
    _, gm = _rewritten(model, x)
    assert _count(gm, "randn") == 1 and _count(gm, "matmul") == 1  # x @ noise; w @ w is hoisted
    (h,) = report_book(None).graphs[-1].hoisted
    assert h["outputs"] == 2 and h["bytes"] == 2 * 64  # w.sum() and m, each padded to 64 bytes


def test_grad_mode_keeps_everything_in_the_graph():
    model = TimeConditioned().train()
    x = torch.randn(4, 32)
    y = _compile(model, quantize=False)(x)  # parameters require grad: hoisting them would cut autograd
    (h,) = report_book(None).graphs[-1].hoisted
    assert h["linears"] == 0 and h["weights"] == 0  # only the constant time embedding
    assert y.requires_grad
