"""compile_regions=True: repeated layers are lowered once, and the result is the whole-graph one.

A toy Gemma stack (4 identical layers) and the golden tiny Pi0.5 (2 LM layers, 10 denoise steps x
2 expert layers), compiled with and without regional lowering.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchao.quantization.utils import compute_error

from quantvla_fx import ConfigError, QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.regions import region_of
from quantvla_fx.testing import ToyGemma, init_toy_gemma

GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"


def compiled_toy(regions, **opts):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = init_toy_gemma(ToyGemma(dim=64, hidden=128, layers=4)).eval()
    x = torch.randn(2, 8, 64)
    captured = {}

    def backend(gm, example_inputs):
        from quantvla_fx.backend import quantvla_backend

        fn = quantvla_backend(gm, example_inputs, QuantVLAConfig(include=(r"mlp\.",), compile_regions=regions, **opts).to_options())
        captured["fn"] = fn
        return fn

    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        ref = model(x)
    return out, ref, captured["fn"]


def test_toy_stack_lowers_each_distinct_layer_once_and_matches_the_whole_graph():
    whole, ref, _ = compiled_toy(False, quantize=False)
    split, _, fn = compiled_toy(True, quantize=False)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-5)
    plan = fn.quantvla_regions
    layers = [r for _, r, _ in plan.runs if r != "glue"]
    assert layers == [f"layers.{i}" for i in range(4)]
    layer_keys = {plan.keys[name] for name, r, _ in plan.runs if r != "glue"}
    assert len(layer_keys) == 1  # four identical layers: one lowering
    assert len(plan.lowered) == len(set(plan.keys.values())) < len(plan.runs)
    assert "reuses submod_" in plan.table()


def test_toy_stack_w4a8_keeps_its_accuracy():
    whole, ref, _ = compiled_toy(False)
    split, _, fn = compiled_toy(True)
    # int8 per-token rounding may flip where fusion differs across a cut: compare accuracy, not bits.
    assert float(compute_error(ref, split)) > float(compute_error(ref, whole)) - 0.5
    assert len(fn.quantvla_report.quantized) == 4 * 3
    assert len({fn.quantvla_regions.keys[name] for name, r, _ in fn.quantvla_regions.runs if r != "glue"}) == 1


def test_region_names_come_from_the_calling_layer():
    class N:
        def __init__(self, path):
            self.meta = {"nn_module_stack": {"k": (path, object)}}

    assert region_of(N("paligemma_with_expert.gemma_expert.model.layers.3.mlp.up_proj")) == \
        "paligemma_with_expert.gemma_expert.model.layers.3"
    assert region_of(N("layers.12.self_attn")) == "layers.12"
    assert region_of(N("vision.layers.1.mlp.layers.0.fc")) == "vision.layers.1"  # the outermost stack
    assert region_of(N("model.norm")) is None


def test_bad_value_is_refused():
    with pytest.raises(ConfigError, match="compile_regions"):
        QuantVLAConfig(compile_regions="yes")


def test_golden_tiny_pi05_with_regions_matches_openpi(tmp_path):
    from quantvla_fx.models.pi05 import Observation, Pi05

    torch._dynamo.reset()
    policy = Pi05.from_pretrained(GOLDEN).eval()
    obs = Observation.from_safetensors(GOLDEN / "inputs.safetensors")
    noise = load_file(str(GOLDEN / "inputs.safetensors"))["noise"]
    expected = load_file(str(GOLDEN / "expected.safetensors"))["actions"]
    cfg = QuantVLAConfig.pi05_mlp(quantize=False, compile_regions=True, dump_dir=str(tmp_path))
    with torch.no_grad():
        actions = torch.compile(policy.sample_actions, backend="quantvla", options=cfg.to_options())(obs, noise=noise)
    assert (actions - expected).abs().max().item() <= 1e-4
    (page,) = tmp_path.glob("graph_*/regions.md")  # one graph; its number depends on earlier tests
    table = page.read_text()
    runs = [line for line in table.splitlines() if line.startswith("| submod_")]
    expert = [line for line in runs if "gemma_expert.model.layers" in line]
    assert len(expert) == 20  # 10 steps x 2 layers
    assert sum("reuses" in line for line in expert) >= 16  # steps 2..10 reuse the lowerings of step 1
    assert len(report_book(str(tmp_path)).graphs[-1].quantized) == 66  # the rewrite is the one without regions
    report = (tmp_path / "report.md").read_text()
    assert f"compile_regions: {len(runs)} runs" in report and page.parent.name in report


def test_graph_inputs_stay_static_inputs_of_every_run(monkeypatch):
    # CUDA graphs copy every non-static input into their pool on each replay: the weights, packs
    # and hoisted values of a run must stay static (as they are for the whole graph), and the
    # activations coming from the run before must not be.
    import quantvla_fx.backend as backend

    seen = []
    real = backend.compile_fx

    def recording(g, args, **kw):
        out = real(g, args, **kw)
        names = [n.name for n in g.graph.nodes if n.op == "placeholder"]
        static = set(torch._guards.TracingContext.get().fw_metadata.static_input_indices)
        seen.append({name: i in static for i, name in enumerate(names)})
        return out

    monkeypatch.setattr(backend, "compile_fx", recording)
    # A cache hit skips AOTAutograd's analysis (no fw_metadata to read): compile for real. (Not
    # monkeypatch: pytest >= 9.2 undoes it with delattr, which hides the option for good.)
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled_toy(True)
    layer_runs = [r for r in seen if any("qv_" in n or "weight" in n for n in r)]
    assert layer_runs
    for run in layer_runs:
        weights = {n: s for n, s in run.items() if "weight" in n or n.startswith("qv_")}
        assert weights and all(weights.values()), run
        assert not all(run.values()), run  # the hidden state from the run before is not static


def test_a_model_without_layer_stacks_is_one_run():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    x = torch.randn(4, 64)
    captured = {}

    def backend(gm, example_inputs):
        from quantvla_fx.backend import quantvla_backend

        captured["fn"] = quantvla_backend(gm, example_inputs, {"include": [".*"], "compile_regions": True})
        return captured["fn"]

    with torch.no_grad():
        got = torch.compile(mlp, backend=backend)(x)
        want = torch.compile(mlp, backend="quantvla", options={"include": [".*"]})(x)
    plan = captured["fn"].quantvla_regions
    assert [r for _, r, _ in plan.runs] == ["glue"] and len(plan.lowered) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
