"""``quantvla-fx inspect`` / ``calibrate``: the backend's decisions without compiling; bad input exits 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantvla_fx.cli import main

TINY = str(Path(__file__).parent / "data" / "pi05_tiny")


def test_inspect_lists_every_linear_with_the_default_selection(capsys):
    assert main(["inspect", TINY]) == 0
    out = capsys.readouterr().out
    assert "12 of 46 linears would be quantized" in out
    assert "paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj" in out
    assert "time_mlp_in" in out and "matches no include rule" in out


def test_inspect_json_follows_flags_and_environment(capsys, monkeypatch):
    assert main(["inspect", TINY, "--json", "--all-linears", "--exclude", "vision_tower|lm_head"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 46 and {"fqn", "quantized", "reason", "bytes_before", "bytes_after"} <= set(rows[0])
    q = [r for r in rows if r["quantized"]]
    assert q and all(r["bytes_after"] < r["bytes_before"] for r in q)
    assert not any("vision_tower" in r["fqn"] and r["quantized"] for r in rows)
    monkeypatch.setenv("OPENPI_BITBLAS_INCLUDE", r".*gemma_expert.*up_proj")
    assert main(["inspect", TINY, "--json"]) == 0
    assert sum(r["quantized"] for r in json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "/nonexistent"], "/nonexistent: no such file or directory"),
    (["inspect", TINY, "--include", "("], "include regex '(' is invalid"),
    (["inspect", TINY + "/README.md"], "only .safetensors checkpoints are supported"),
    (["inspect", TINY, "--group-size", "3"], "group_size=3"),
    (["calibrate", TINY, "--out", "x.safetensors", "--data", "/nonexistent.safetensors"], "no such calibration file"),
])
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_calibrate_writes_packs_the_backend_reads(tmp_path, capsys):
    from quantvla_fx.duquant import load_packs

    out = tmp_path / "packs.safetensors"
    assert main(["calibrate", TINY, "--out", str(out), "--block-size", "32"]) == 0
    assert "12 linears in 8 groups from 1 batch(es)" in capsys.readouterr().out
    assert len(load_packs(out)) == 12


def test_console_script_and_module_entry_point():
    for cmd in (["quantvla-fx"], [sys.executable, "-m", "quantvla_fx"]):
        res = subprocess.run(cmd + ["inspect", "/nonexistent"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "no such file or directory" in res.stderr
