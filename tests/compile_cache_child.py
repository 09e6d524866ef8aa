"""One process of tests/test_compile_cache.py: compile the tiny golden Pi0.5 with quantvla, once.

    python tests/compile_cache_child.py OUT_DIR cold|warm

cold: compile, then ``compile_cache.save(OUT_DIR/pi05.cache)``; warm: ``compile_cache.load`` first.
Writes OUT_DIR/<mode>.json (compile seconds, cache hit/miss counters) and OUT_DIR/<mode>.pt (actions).
The caller sets TORCHINDUCTOR_CACHE_DIR to an empty folder of this process's own.
"""
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import quantvla_fx.compile_cache as compile_cache
from quantvla_fx import QuantVLAConfig
from quantvla_fx.models.pi05 import Observation, Pi05

GOLDEN = Path(__file__).parent / "data" / "pi05_tiny"


def main(out: Path, mode: str) -> None:
    if mode == "warm":
        compile_cache.load(out / "pi05.cache")
    policy = Pi05.from_pretrained(GOLDEN).eval()
    obs = Observation.from_safetensors(GOLDEN / "inputs.safetensors")
    noise = load_file(str(GOLDEN / "inputs.safetensors"))["noise"]
    fn = torch.compile(policy.sample_actions, backend="quantvla", options=QuantVLAConfig.pi05_mlp().to_options())
    with torch.no_grad():
        t0 = time.perf_counter()
        actions = fn(obs, noise=noise)
        seconds = time.perf_counter() - t0
    if mode == "cold":
        compile_cache.save(out / "pi05.cache")
    counters = torch._dynamo.utils.counters
    torch.save(actions, out / f"{mode}.pt")
    (out / f"{mode}.json").write_text(json.dumps({
        "seconds": seconds,
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "autograd_cache_bypass": counters["aot_autograd"]["autograd_cache_bypass"],
        "quantized": len(fn_report(fn)),
    }))


def fn_report(fn):
    from quantvla_fx.backend import report_book

    return [r for g in report_book(None).graphs for r in g.quantized]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
