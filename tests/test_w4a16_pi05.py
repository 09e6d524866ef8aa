"""W4A16 on Pi0.5: the seeds' W4FP16 environment (their exact export lines) selects what their
script selects and compiles with W4A16; on the golden tiny Pi0.5 W4A16's action SQNR is at least
W4A8's (round-to-nearest, the seeds' settings)."""
from __future__ import annotations

import shlex

import torch
from torchao.quantization.utils import compute_error

from quantvla_fx import QuantVLAConfig
from quantvla_fx.backend import report_book
from quantvla_fx.selection import weight_rule_violation

# The "Environment Variables" block of the seeds' BitBLAS W4FP16 document, verbatim.
SEED_W4FP16_SCRIPT = r"""
# Enable BitBLAS
export OPENPI_BITBLAS_ENABLE=1

# Quantization settings
export OPENPI_BITBLAS_WBITS=4              # 4-bit weights
export OPENPI_BITBLAS_GROUP_SIZE=128       # Group size for quantization
export OPENPI_BITBLAS_ENABLE_TUNING=0      # Set to 1 for auto-tuning (first run)
export OPENPI_BITBLAS_OPT_M="1,16,32,64"   # Optimize for these batch sizes

# Reuse DuQuant parameters
export OPENPI_BITBLAS_DUQUANT_PACKDIR="duquant_packed_full_llm_dit_mlp_w4a8_atm"

# Layer selection (MLP only - same as DuQuant)
export OPENPI_BITBLAS_INCLUDE='(.*language_model.*(gate_proj|up_proj|down_proj).*|.*gemma_expert.*(gate_proj|up_proj|down_proj).*)'
export OPENPI_BITBLAS_EXCLUDE='(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower)(?:\.|$)'

# Debug
export OPENPI_BITBLAS_DEBUG=1

# IMPORTANT: Disable DuQuant to avoid conflicts
unset OPENPI_DUQUANT_WBITS_DEFAULT
unset OPENPI_DUQUANT_ABITS
"""


def seed_env() -> dict[str, str]:
    """What bash would export from the block above (comments and unsets dropped)."""
    env = {}
    for line in SEED_W4FP16_SCRIPT.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def test_seed_env_is_read_whole():
    env = seed_env()
    assert len(env) == 9 and env["OPENPI_BITBLAS_INCLUDE"].startswith("(.*language_model")
    cfg = QuantVLAConfig.from_env(env)
    assert cfg.scheme == "w4a16" and cfg.w4a16_group_size == 128 and cfg.weight_bits == 4
    assert cfg.opt_m == (1, 16, 32, 64) and not cfg.enable_tuning and cfg.debug
    assert cfg.packs == "duquant_packed_full_llm_dit_mlp_w4a8_atm"
    assert cfg.include == (env["OPENPI_BITBLAS_INCLUDE"],) and cfg.exclude == (env["OPENPI_BITBLAS_EXCLUDE"],)
    off = QuantVLAConfig.from_env({**env, "OPENPI_BITBLAS_ENABLE": "0"})
    assert off.include == () and not off.match("x.language_model.layers.0.mlp.up_proj")[0]
    assert QuantVLAConfig.from_env({k: v for k, v in env.items() if k != "OPENPI_BITBLAS_ENABLE"}).scheme == "w4a8"


def test_seed_env_selects_their_108_linears_on_full_size_pi05():
    """gate, up and down of every LM and expert layer (18 + 18 layers), W4A16 with group 128; nothing else."""
    from quantvla_fx.models.pi05 import Pi05, Pi05Config

    cfg = QuantVLAConfig.from_env(seed_env())
    with torch.device("meta"):
        model = Pi05(Pi05Config.pi05_libero())
    chosen = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and cfg.match(fqn)[0]:
            scheme, _ = cfg.scheme_for(fqn)
            group = cfg.group_size_for(scheme, mod.in_features)
            assert weight_rule_violation(tuple(mod.weight.shape), torch.bfloat16, group) is None, fqn
            chosen.append((fqn.split(".mlp.")[0].rsplit(".layers.", 1)[0], fqn.rsplit(".", 1)[1], scheme, group))
    assert len(chosen) == 108
    assert {c[2:] for c in chosen} == {("w4a16", 128)}
    assert {(c[0].rsplit(".", 1)[-1], c[1]) for c in chosen} == {
        (part, proj) for part in ("language_model", "model") for proj in ("gate_proj", "up_proj", "down_proj")}


def _sample(policy, obs, noise, cfg):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(policy.sample_actions, backend="quantvla", options=cfg.to_options())(obs, noise=noise)


def test_seed_env_compiles_golden_tiny_pi05_with_w4a16(golden_pi05_calibrated, tmp_path, monkeypatch):
    """Their exact variables, packs in their folder name (our calibration of the tiny model there)."""
    policy, obs, noise, packs = golden_pi05_calibrated
    monkeypatch.chdir(tmp_path)
    (tmp_path / "duquant_packed_full_llm_dit_mlp_w4a8_atm").mkdir()
    packs.save(str(tmp_path / "duquant_packed_full_llm_dit_mlp_w4a8_atm" / "packs.safetensors"))
    for k, v in seed_env().items():
        monkeypatch.setenv(k, v)
    cfg = QuantVLAConfig.from_env()
    actions = _sample(policy, obs, noise, cfg)
    rep = report_book(None).graphs[-1]
    assert len(rep.quantized) == 66  # (LM + 10 steps × expert) × 2 layers × 3 MLP linears, unrolled
    assert {r.scheme for r in rep.quantized} == {"w4a16"}
    assert all(r.op.startswith("quantvla::w4a16_linear") for r in rep.quantized)
    assert {r.fqn.rsplit(".", 1)[1] for r in rep.quantized} == {"gate_proj", "up_proj", "down_proj"}
    assert all(r.group_size == -1 for r in rep.quantized)  # tiny K <= 128: one group per row
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    assert float(compute_error(ref, actions)) >= 20


def test_w4a16_action_sqnr_at_least_w4a8_on_golden(golden_pi05_calibrated):
    """Round-to-nearest, the seeds' settings (group 128: one group per row at the tiny K) and group 32."""
    policy, obs, noise, _ = golden_pi05_calibrated
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    cfg = QuantVLAConfig.pi05_mlp(lowering="eager")  # the reference kernels either way; eager compiles faster
    w4a8 = float(compute_error(ref, _sample(policy, obs, noise, cfg)))
    for group in (128, 32):
        w4a16 = float(compute_error(ref, _sample(policy, obs, noise, cfg.replace(scheme="w4a16", w4a16_group_size=group))))
        print(f"golden tiny Pi0.5 actions: W4A8 {w4a8:.2f} dB, W4A16 (group {group}) {w4a16:.2f} dB")
        assert w4a16 >= w4a8, group


def test_mixed_schemes_with_duquant_packs_are_exact_without_quantization(golden_pi05_calibrated):
    """gate_proj W4A16 next to up_proj W4A8 (one input, two groups, one pack transform): the
    transforms stay exact (smoothing online where the producer is shared) and both schemes run."""
    policy, obs, noise, packs = golden_pi05_calibrated
    with torch.no_grad():
        ref = policy.sample_actions(obs, noise=noise)
    cfg = QuantVLAConfig.pi05_mlp(packs=packs, layer_schemes={"gate_proj": "w4a16"}, lowering="eager")
    plain = _sample(policy, obs, noise, cfg.replace(quantize=False))
    assert float((plain - ref).abs().max()) <= 1e-5
    got = _sample(policy, obs, noise, cfg)
    rep = report_book(None).graphs[-1]
    schemes = {r.fqn.rsplit(".", 1)[1]: r.scheme for r in rep.quantized}
    assert schemes == {"gate_proj": "w4a16", "up_proj": "w4a8", "down_proj": "w4a8"}
    assert float(compute_error(ref, got)) >= 20
