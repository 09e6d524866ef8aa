"""A group of linears reading one activation (q/k/v, gate/up) runs as ONE op over stacked packs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantvla_fx.ops  # noqa: F401
from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.derived_inputs import PACK_CACHE
from quantvla_fx.quant.activations import quantize_per_token
from quantvla_fx.quant.weights import pack_weight
from quantvla_fx.testing import ToyGemma, init_toy_gemma

W4A8_OPS = (torch.ops.quantvla.w4a8_linear.default, torch.ops.quantvla.w4a8_mm.default)


class QKV(nn.Module):
    """Three linears on one input, one with a bias and one without; outputs reshaped to heads."""

    def __init__(self, k=64, n=(64, 32, 32)):
        super().__init__()
        self.q_proj = nn.Linear(k, n[0], bias=True)
        self.k_proj = nn.Linear(k, n[1], bias=False)
        self.v_proj = nn.Linear(k, n[2], bias=True)

    def forward(self, x):
        q = self.q_proj(x).view(*x.shape[:-1], -1, 16)
        return q.sum(-1), self.k_proj(x) * 2, self.v_proj(x).reshape(-1)  # reshape: needs a dense copy


def _capture(opts, model, x):
    """Compile with the eager lowering; return outputs and the rewritten graph."""
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
            y = torch.compile(model, backend="quantvla", options={**opts, "lowering": "eager"})(x)
    finally:
        backend.rewrite = original
    return y, seen["gm"]


def _ops(gm, targets):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


@pytest.mark.parametrize("epilogue", ["fused", "int32"])
def test_one_w4a8_op_is_integer_exact_vs_one_op_per_linear(epilogue):
    torch.manual_seed(0)
    model = QKV().eval()
    x = torch.randn(2, 5, 64)
    opts = QuantVLAConfig(include=[".*"], exclude=[], epilogue=epilogue).to_options()
    (q, k, v), gm = _capture(opts, model, x)
    assert len(_ops(gm, W4A8_OPS)) == 1
    # The reference: each linear quantized on its own, through the same op.
    x_q, x_s = quantize_per_token(x)
    refs = []
    for lin in (model.q_proj, model.k_proj, model.v_proj):
        pw = pack_weight(lin.weight.detach())
        if epilogue == "fused":
            refs.append(torch.ops.quantvla.w4a8_linear(x_q, x_s, pw.packed, pw.scale, lin.bias, torch.float32))
        else:
            acc = torch.ops.quantvla.w4a8_mm(x_q, pw.packed)
            out = acc.float() * x_s * pw.scale
            refs.append(out if lin.bias is None else out + lin.bias.detach().float())
    assert torch.equal(q, refs[0].view(2, 5, -1, 16).sum(-1))
    assert torch.equal(k, refs[1] * 2)
    assert torch.equal(v, refs[2].reshape(-1))
    records = {r.fqn: r for r in report_book(None).graphs[-1].linears}
    assert set(records) == {"q_proj", "k_proj", "v_proj"}  # every linear keeps its row in the report
    assert "one op for" in records["k_proj"].op and "rows 64:96 of 128" in records["k_proj"].op


def test_float_group_is_one_linear_and_matches_eager():
    torch.manual_seed(0)
    model = QKV().eval()
    x = torch.randn(2, 5, 64)
    opts = QuantVLAConfig(include=[".*"], exclude=[], quantize=False).to_options()
    got, gm = _capture(opts, model, x)
    with torch.no_grad():
        ref = model(x)
    assert len(_ops(gm, (F.linear, torch._C._nn.linear))) == 1
    for a, b in zip(got, ref):
        assert float((a - b).abs().max()) <= 1e-5


def test_toy_gemma_one_op_per_group_and_inductor_matches_eager_rewrite():
    model = init_toy_gemma(ToyGemma(dim=64, hidden=128, layers=2)).eval()
    x = torch.randn(2, 12, 64)
    opts = QuantVLAConfig.all_linears().to_options()
    eager, gm = _capture(opts, model, x)
    # per layer: {q,k,v} one op, o one, {gate,up} one, down one
    assert len(_ops(gm, W4A8_OPS)) == 2 * 4
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="quantvla", options=opts)(x)
    assert float((compiled - eager).abs().max() / eager.abs().max()) <= 1e-5


def test_editing_one_member_repacks_the_group():
    torch.manual_seed(0)
    model = QKV().eval()
    x = torch.randn(3, 64)
    fn = torch.compile(model, backend="quantvla", options=QuantVLAConfig(include=[".*"], exclude=[]).to_options())
    with torch.no_grad():
        before = fn(x)
        builds = PACK_CACHE.builds
        model.k_proj.weight.mul_(-1.0)  # one member, in place
        after = fn(x)
    assert PACK_CACHE.builds > builds
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    pw = pack_weight(model.k_proj.weight.detach())
    x_q, x_s = quantize_per_token(x)
    assert torch.equal(after[1], 2 * torch.ops.quantvla.w4a8_linear(x_q, x_s, pw.packed, pw.scale, None, torch.float32))
    assert not torch.equal(after[1], before[1])


class GateUp(nn.Module):
    def __init__(self, k=64, n=64):
        super().__init__()
        self.gate_proj = nn.Linear(k, n, bias=True)
        self.up_proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)


def _orthogonal(nb, b, g):
    return torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))[0].float()


def _shared_transform_packs(k=64, n=64):
    """DuQuant-style packs: gate and up share one input transform; gate also has an output rotation."""
    from quantvla_fx.duquant.packs import LayerPack, Packs
    from quantvla_fx.duquant.transform import DuQuantTransform

    g = torch.Generator().manual_seed(1)
    t = DuQuantTransform(in_features=k, block_size=32, smooth=torch.rand(k, generator=g) + 0.5,
                         rot1=_orthogonal(k // 32, 32, g), perm=torch.randperm(k, generator=g))
    return Packs([LayerPack("gate_proj", t, "{gate_proj,up_proj}", out_rot=_orthogonal(n // 16, 16, g)),
                  LayerPack("up_proj", t, "{gate_proj,up_proj}")])


@pytest.mark.parametrize("quantize", [False, True])
def test_duquant_group_is_one_op_and_the_output_rotation_is_restored_on_its_rows(quantize):
    torch.manual_seed(0)
    model = GateUp().eval()
    x = torch.randn(2, 5, 64)
    opts = QuantVLAConfig(include=[".*"], exclude=[], packs=_shared_transform_packs(), quantize=quantize).to_options()
    got, gm = _capture(opts, model, x)
    with torch.no_grad():
        ref = model(x)
    targets = W4A8_OPS if quantize else (F.linear, torch._C._nn.linear)
    assert len(_ops(gm, targets)) == 1
    records = {r.fqn: r for r in report_book(None).graphs[-1].linears}
    assert "output rotation restored online" in records["gate_proj"].duquant
    if quantize:  # integer-exact against each linear quantized on its own: transform, quantize, GEMM, restore
        from quantvla_fx.duquant.transform import restore_output
        from quantvla_fx.weight_recipe import WeightRecipe

        packs = _shared_transform_packs()
        t, rot = packs["gate_proj"].transform, packs["gate_proj"].out_rot
        x_q, x_s = quantize_per_token(t.transform_activation(x))
        with torch.no_grad():
            pg, sg = WeightRecipe(-1, 1.0, t, rot)(model.gate_proj.weight)
            pu, su = WeightRecipe(-1, 1.0, t)(model.up_proj.weight)
            gate = restore_output(torch.ops.quantvla.w4a8_linear(x_q, x_s, pg, sg, None, torch.float32), rot)
            up = torch.ops.quantvla.w4a8_linear(x_q, x_s, pu, su, None, torch.float32)
            want = F.gelu(gate + model.gate_proj.bias, approximate="tanh") * up
        assert torch.equal(got, want)
    else:  # the transforms and the restore are exact algebra
        assert float((got - ref).abs().max()) <= 1e-5
