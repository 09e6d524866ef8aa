"""Each fold rule on our Pi0.5 as gemma.py writes it, and on equivalent rewrites of the same modules:
a harmless edit of the model must not turn a fold off, and every fold stays exact."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.models.pi05.gemma import GemmaMLP, GemmaRMSNorm

CFG = QuantVLAConfig.pi05_mlp()
LM, EXPERT = "paligemma.model.language_model.layers", "gemma_expert.model.layers"


# -- the same modules, spelled differently ----------------------------------------------------
def norm_sliced(self, x, cond=None):
    """(1+w) as x + x*w; adaRMS by slicing after a view, shift first, (scale + 1) first."""
    dtype, normed = x.dtype, self._norm(x)
    if self.dense is None:
        return (normed + normed * self.weight.float()).to(dtype), None
    mod = self.dense(cond.to(self.dense.weight.dtype))
    if x.ndim == 3:
        mod = mod.view(mod.shape[0], 1, -1)
    d = self.dim
    scale, shift, gate = mod[..., :d], mod[..., d:2 * d], mod[..., 2 * d:]
    return (shift.float() + (scale.float() + 1) * normed).to(dtype), gate.to(dtype)


def norm_split(self, x, cond=None):
    """(1+w) as .mul(w + 1); adaRMS by torch.split, as x + x*scale + shift."""
    dtype, normed = x.dtype, self._norm(x)
    if self.dense is None:
        return normed.mul(self.weight.float() + 1.0).to(dtype), None
    mod = self.dense(cond.to(self.dense.weight.dtype))
    if x.ndim == 3:
        mod = mod.unsqueeze(1)
    scale, shift, gate = torch.split(mod, self.dim, dim=-1)
    return (normed + normed * scale.float() + shift.float()).to(dtype), gate.to(dtype)


def mlp_torch_mul(self, x):
    return self.down_proj(torch.mul(self.up_proj(x), F.gelu(self.gate_proj(x), approximate="tanh")))


def mlp_method_mul(self, x):
    return self.down_proj(self.up_proj(x).mul(F.gelu(self.gate_proj(x), approximate="tanh")))


SPELLINGS = {"gemma.py": {}, "sliced": {"norm": norm_sliced, "mlp": mlp_torch_mul},
             "split": {"norm": norm_split, "mlp": mlp_method_mul}}


@pytest.fixture(scope="module", params=list(SPELLINGS))
def folded(request, golden_pi05_calibrated):
    """(folds by kind and layer, max |compiled - eager|) of one spelling, quantize=False."""
    policy, obs, noise, packs = golden_pi05_calibrated
    with pytest.MonkeyPatch.context() as mp:
        for cls, key in ((GemmaRMSNorm, "norm"), (GemmaMLP, "mlp")):
            if key in SPELLINGS[request.param]:
                mp.setattr(cls, "forward", SPELLINGS[request.param][key])
        torch._dynamo.reset()
        with torch.no_grad():
            opts = CFG.replace(packs=packs, quantize=False, lowering="eager").to_options()
            got = torch.compile(policy.sample_actions, backend="quantvla", options=opts)(obs, noise=noise)
            ref = policy.sample_actions(obs, noise=noise)
    folds = Counter()  # (fold, linear, stack) -> how many call sites
    for r in report_book(None).graphs[-1].quantized:
        for n in r.duquant:
            if n.startswith("smoothing folded into") or n.startswith("output rows divided"):
                folds[(_kind(n), r.fqn.rsplit(".", 1)[-1], LM if LM in r.fqn else EXPERT)] += 1
    return folds, float((got - ref).abs().max())


def _kind(note: str) -> str:
    kinds = (("smoothing folded into norm weight", "gemma_norm"), ("smoothing folded into adaRMS", "adarms"),
             ("output rows divided", "rows divided"))
    for prefix, kind in kinds:
        if note.startswith(prefix):
            return kind
    assert note.endswith("up_proj output rows"), note
    return "producer_rows"


def test_gemma_norm_rule(folded):
    folds, err = folded
    # LM: 2 layers x {gate, up} read the post-attention norm, whose (1+w) takes 1/s.
    assert folds[("gemma_norm", "gate_proj", LM)] == 2 and folds[("gemma_norm", "up_proj", LM)] == 2, folds
    assert err <= 1e-5  # fp32: the folded weight is rounded to fp32 once, nothing more


def test_adarms_rule(folded):
    folds, err = folded
    # Expert: 2 layers x 10 denoise steps x {gate, up} read an adaRMS norm; its dense's scale/shift rows fold.
    assert folds[("adarms", "gate_proj", EXPERT)] == 20 and folds[("adarms", "up_proj", EXPERT)] == 20, folds
    assert err <= 1e-5


def test_producer_rows_rule(folded):
    folds, err = folded
    # Every down_proj (2 LM + 20 expert) folds into the rows of the up_proj that feeds it.
    assert sum(folds.values()) == 4 + 40 + 2 * 22  # and nothing else folds anywhere
    for stack, n in ((LM, 2), (EXPERT, 20)):
        assert folds[("producer_rows", "down_proj", stack)] == n, folds
        assert folds[("rows divided", "up_proj", stack)] == n, folds
    assert err <= 1e-5
