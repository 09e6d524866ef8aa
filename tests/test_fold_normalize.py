"""The normal form fold rules match in (passes/folds/normalize.py), and the conditions that keep a
fold exact: a fold applies to equivalent spellings, and never where another reader would see it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantvla_fx import QuantVLAConfig, calibrate
from quantvla_fx.backend import report_book
from quantvla_fx.passes.folds import NormalView, gemma_norm
from quantvla_fx.testing import GemmaRMSNorm


def _dynamo_graph(fn, *args) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return graphs[0]


def _outputs(gm: torch.fx.GraphModule, view: NormalView) -> list:
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return [view.of[a] for a in torch.fx.node.map_aggregate(out.args[0], lambda a: a) if isinstance(a, torch.fx.Node)]


def _rms(a):
    return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)


NORM_SPELLINGS = {
    "x*(1+w)": lambda a, w: _rms(a) * (1 + w),
    "x*(w+1.0)": lambda a, w: _rms(a) * (w + 1.0),
    "(1+w.float())*x": lambda a, w: (1.0 + w.float()) * _rms(a),
    "x+x*w": lambda a, w: (lambda x: x + x * w)(_rms(a)),
    "x*w+x": lambda a, w: (lambda x: x * w + x)(_rms(a)),
    "torch.mul/add": lambda a, w: torch.mul(_rms(a), torch.add(w, 1)),
    "methods": lambda a, w: _rms(a).mul(w.add(1)),
    "casts": lambda a, w: (_rms(a) * (1 + w.to(torch.float32))).to(torch.float32).contiguous(),
}


@pytest.mark.parametrize("spelling", list(NORM_SPELLINGS))
def test_every_spelling_of_the_gemma_norm_is_one_normal_form(spelling):
    gm = _dynamo_graph(NORM_SPELLINGS[spelling], torch.randn(3, 16), torch.randn(16))
    before = gm.code
    view = NormalView(gm.graph)
    assert gm.code == before  # the view is a copy: the graph that runs is untouched
    (root,) = _outputs(gm, view)
    matches = [m for m in (p.match(root) for p in gemma_norm.RULE.variants) if m]
    assert matches, view.graph
    (w,) = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "l_w_"]
    assert view.origin[matches[0].kwargs["w"]] is w


LOOK_ALIKES = {
    "x*(2+w)": lambda a, w: _rms(a) * (2 + w),
    "x*(1+alpha*w)": lambda a, w: _rms(a) * torch.add(1, w, alpha=2),
    "x+x*w, two x": lambda a, w: _rms(a) + (_rms(a) + 0) * w,
    "x-x*w": lambda a, w: (lambda x: x - x * w)(_rms(a)),
}


@pytest.mark.parametrize("spelling", list(LOOK_ALIKES))
def test_look_alikes_are_not_the_gemma_norm(spelling):
    gm = _dynamo_graph(LOOK_ALIKES[spelling], torch.randn(3, 16), torch.randn(16))
    view = NormalView(gm.graph)
    (root,) = _outputs(gm, view)
    assert not any(p.match(root) for p in gemma_norm.RULE.variants), view.graph


D = 8
PIECES = {
    "torch.chunk": lambda m: torch.chunk(m, 3, -1),
    "method chunk, dim=2": lambda m: m.chunk(3, dim=2),
    "torch.split": lambda m: torch.split(m, D, dim=-1),
    "split sizes": lambda m: m.split([D, D, D], -1),
    "slices": lambda m: (m[..., :D], m[..., D:2 * D], m[..., 2 * D:]),
    "full slices": lambda m: (m[:, :, :D], m[:, :, D:2 * D], m[:, :, -D:]),
    "narrow": lambda m: (m.narrow(-1, 0, D), m.narrow(2, D, D), torch.narrow(m, -1, 2 * D, D)),
    "unsqueeze first": lambda m: torch.chunk(m[:, 0].unsqueeze(1), 3, -1),
}


@pytest.mark.parametrize("spelling", list(PIECES))
def test_chunk_split_and_slices_are_one_narrow_form(spelling):
    gm = _dynamo_graph(lambda m: tuple(p * 2 for p in PIECES[spelling](m)), torch.randn(2, 1, 3 * D))
    view = NormalView(gm.graph)
    pieces = [root.args[0] for root in _outputs(gm, view)]
    assert [p.target for p in pieces] == [torch.narrow] * 3, view.graph
    assert [p.args[1:] for p in pieces] == [(-1, 0, D), (-1, D, D), (-1, 2 * D, D)]
    assert len({p.args[0] for p in pieces}) == 1  # all three read the same tensor


def test_pieces_of_another_dim_stay_as_they_are():
    gm = _dynamo_graph(lambda m: tuple(p * 2 for p in torch.chunk(m, 2, 0)), torch.randn(4, 3 * D))
    view = NormalView(gm.graph)
    assert not any(n.target is torch.narrow for n in view.graph.nodes)


# -- through the backend: folds that would be seen elsewhere are refused, the rest stay exact ---
CFG = QuantVLAConfig(include=(r"mlp\.",))


class NormMLP(nn.Module):
    """Gemma norm -> GeGLU; ``leak`` reads a value that a fold would change."""

    def __init__(self, leak=None, k=64, h=128):
        super().__init__()
        self.norm = GemmaRMSNorm(k)
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(k, h, bias=False), "up_proj": nn.Linear(k, h, bias=False),
                                  "down_proj": nn.Linear(h, k, bias=False)})
        self.leak = leak
        with torch.no_grad():
            self.norm.weight.normal_(0, 0.1)

    def forward(self, x):
        h = self.norm(x)
        g, u = self.mlp["gate_proj"](h), self.mlp["up_proj"](h)
        prod = u * u if self.leak == "square" else F.gelu(g, approximate="tanh") * u
        y = self.mlp["down_proj"](prod)
        if self.leak == "norm":
            y = y + h
        if self.leak == "up":
            y = y + u[..., :64]
        return y


class AdaNormMLP(nn.Module):
    """adaRMS with a ``[gate|scale|shift]`` dense (other offsets than gemma.py); ``overlap``: the
    gate also reads scale rows."""

    def __init__(self, overlap=False, k=64, h=128, c=16):
        super().__init__()
        self.dense = nn.Linear(c, 3 * k)
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(k, h, bias=False), "up_proj": nn.Linear(k, h, bias=False)})
        self.k, self.overlap = k, overlap

    def forward(self, x, cond):
        k = self.k
        mod = self.dense(cond).unsqueeze(1)
        gate, scale, shift = mod[..., :k], mod[..., k:2 * k], mod[..., 2 * k:]
        if self.overlap:
            gate = mod[..., k // 2:k // 2 + k]
        normed = _rms(x) * (1 + scale) + shift
        return (self.mlp["gate_proj"](normed) + self.mlp["up_proj"](normed)) * gate.sum()


def _fold_notes(model, args):
    packs = calibrate(model, [args], CFG, block_size=32, progress=False, search=False)
    torch._dynamo.reset()
    with torch.no_grad():
        opts = CFG.replace(packs=packs, quantize=False, lowering="eager").to_options()
        got = torch.compile(model, backend="quantvla", options=opts)(*args)
        ref = model(*args)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    return {r.fqn: [n for n in r.duquant if n.startswith("smoothing")] for r in report_book(None).graphs[-1].quantized}


@pytest.mark.parametrize("leak", [None, "norm", "up", "square"])
def test_a_fold_is_refused_where_another_reader_would_see_it(leak):
    torch.manual_seed(0)
    notes = _fold_notes(NormMLP(leak).eval(), (torch.randn(2, 8, 64),))
    online = ["smoothing online (no foldable producer)"]
    assert (notes["mlp.gate_proj"] == online) == (leak == "norm"), notes
    assert (notes["mlp.down_proj"] == online) == (leak in ("up", "square")), notes
    if leak is None:
        assert notes["mlp.down_proj"] == ["smoothing folded into mlp.up_proj output rows"]


@pytest.mark.parametrize("overlap", [False, True])
def test_adarms_folds_the_rows_the_pattern_found_and_only_if_nothing_else_reads_them(overlap):
    torch.manual_seed(0)
    notes = _fold_notes(AdaNormMLP(overlap).eval(), (torch.randn(2, 8, 64), torch.randn(2, 16)))
    folded = ["smoothing folded into adaRMS dense._parameters.weight (scale and shift rows)"]
    assert notes["mlp.gate_proj"] == (["smoothing online (no foldable producer)"] if overlap else folded), notes
