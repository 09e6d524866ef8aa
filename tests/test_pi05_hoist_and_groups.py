"""Pi0.5 (openpi's tiny golden checkpoint) with the hoist and the one-op groups: still openpi's actions."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.concat_recipe import ConcatRecipe
from quantvla_fx.models.pi05 import Observation, Pi05

GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"
ATOL = 1e-4  # as tests/test_pi05_golden.py


@pytest.fixture(scope="module")
def golden():
    policy = Pi05.from_pretrained(GOLDEN).eval()
    obs = Observation.from_safetensors(GOLDEN / "inputs.safetensors")
    noise = load_file(str(GOLDEN / "inputs.safetensors"))["noise"]
    return policy, obs, noise, load_file(str(GOLDEN / "expected.safetensors"))["actions"]


def _compiled(policy, **opts):
    import quantvla_fx.backend as backend

    seen = {}
    original = backend.rewrite

    def spy(gm, example_inputs, config):
        out = original(gm, example_inputs, config)
        seen["gm"], seen["ctx"] = out
        return out

    backend.rewrite = spy
    fn = torch.compile(policy.sample_actions, backend="quantvla", fullgraph=True,
                       options=QuantVLAConfig.all_linears(**opts).to_options())
    return fn, seen, lambda: setattr(backend, "rewrite", original)


def test_float_rewrite_matches_openpi_and_time_path_is_hoisted(golden):
    policy, obs, noise, expected = golden
    fn, seen, restore = _compiled(policy, quantize=False, lowering="eager")
    try:
        with torch.no_grad():
            actions = fn(obs, noise=noise)
    finally:
        restore()
    assert float((actions - expected).abs().max()) <= ATOL
    gm, ctx = seen["gm"], seen["ctx"]
    cfg = policy.config
    print(ctx.report.hoisted)
    # Nothing reads the time MLP's or any adaRMS dense's weights any more, and the time path's ops are gone.
    time_weights = [n for n in gm.graph.nodes if n.op == "placeholder" and ("time_mlp" in n.name or "_dense_" in n.name)]
    assert len(time_weights) == 4 + 2 * (2 * cfg.expert.depth + 1)
    assert not [n for n in time_weights if n.users]
    names = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op != "placeholder"}
    assert not names & {"silu", "linspace", "chunk"}
    left = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    (h,) = report_book(None).graphs[-1].hoisted
    # time MLP (2) + per step every expert layer's two adaRMS dense and the final norm's
    assert h["linears"] == 2 + cfg.num_steps * (2 * cfg.expert.depth + 1)
    hoisted = {r.fqn for r in report_book(None).graphs[-1].linears if (r.op or "").startswith("hoisted")}
    assert {"time_mlp_in", "time_mlp_out"} <= hoisted
    # The denoise steps call the same expert modules: one stacked pack per group, not one per step.
    stacked = [s for s in ctx.inputs.specs if isinstance(s.compute, ConcatRecipe)]
    assert len(stacked) == 2 * cfg.llm.depth + 2 * cfg.expert.depth  # {q,k,v} and {gate,up} per layer
    # Per step the expert's 7 linears a layer are 4 GEMMs ({q,k,v}, o, {gate,up}, down), plus action in/out;
    # the LM's likewise; the vision tower (not selected) keeps its 6 a layer, the projector 1.
    per_step = 4 * cfg.expert.depth + 2
    assert len(left) == cfg.num_steps * per_step + 4 * cfg.llm.depth + 6 * cfg.vision.num_hidden_layers + 1


def test_w4a8_with_hoist_sees_edits_of_the_time_mlp(golden):
    policy, obs, noise, _ = golden
    fn, _, restore = _compiled(policy, lowering="eager")
    w = policy.time_mlp_out.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            first = fn(obs, noise=noise)
            w.mul_(0.5)  # a hoisted weight, in place
            edited = fn(obs, noise=noise)
            torch._dynamo.reset()
            fresh, _, restore2 = _compiled(policy, lowering="eager")  # compiled from the edited weights
            restore2()
            expected_edit = fresh(obs, noise=noise)
            w.copy_(saved)
            again = fn(obs, noise=noise)
    finally:
        restore()
        with torch.no_grad():
            w.copy_(saved)
    assert not torch.equal(edited, first)
    assert torch.equal(edited, expected_edit)  # re-derived exactly as a compile would
    assert torch.equal(again, first)
