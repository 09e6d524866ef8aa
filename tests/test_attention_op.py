"""quantvla::attention on the CPU: the op against attention written out in float64 (SDPA math with
openpi's finite mask), at the masks Pi0.5 produces and in the GQA layouts the pass emits."""
import pytest
import torch

import quantvla_fx.ops  # noqa: F401
from quantvla_fx.attention_support import auto_choice, cannot_run
from quantvla_fx.kernels.attention import select


def math_attention(q, k, v, key_valid, query_valid, scale):
    """Softmax attention in float64; a row that sees no key averages all values (finite mask)."""
    b, hq, lq, _ = q.shape
    g = hq // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(b, 1, lq, k.shape[2], dtype=torch.bool)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if query_valid is not None:
        allowed = allowed & query_valid[:, None, :, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    none = ~allowed.any(-1, keepdim=True).expand_as(p)
    p = torch.where(none, 1.0 / k.shape[2], p)
    return p @ v


def pi05_prefix_pad(batch_prompt_lens, image_tokens=16, cameras=3, prompt=12, masked_camera=None):
    """(B, P) pad mask laid out as Pi0.5's prefix: cameras' tokens, then the prompt, padded at its end."""
    rows = []
    for b, n in enumerate(batch_prompt_lens):
        cams = [torch.full((image_tokens,), not (masked_camera is not None and masked_camera[b] == c))
                for c in range(cameras)]
        rows.append(torch.cat(cams + [torch.arange(prompt) < n]))
    return torch.stack(rows)


CASES = {
    # padding in the middle of the prefix: a masked camera between two valid ones, batch 2 with
    # different prompt lengths; keys = prefix + 10 action tokens (the expert)
    "expert_masked_camera": dict(hq=8, hkv=1, lq=10, prompt_lens=(12, 5), masked_camera=(1, None), rows=False),
    "prefix_query_and_key_padding": dict(hq=8, hkv=1, lq=None, prompt_lens=(12, 3), masked_camera=(None, 0), rows=True),
    "gqa_4_over_2": dict(hq=4, hkv=2, lq=7, prompt_lens=(2, 9), masked_camera=(2, None), rows=False),
    "mha": dict(hq=3, hkv=3, lq=None, prompt_lens=(12, 1), masked_camera=(None, None), rows=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_is_sdpa_math_in_fp32(name):
    c = CASES[name]
    torch.manual_seed(0)
    pad = pi05_prefix_pad(c["prompt_lens"], masked_camera=c["masked_camera"])
    d = 24
    if c["lq"] is None:  # the prefix attends to itself: padded query rows see nothing
        key_valid, query_valid, lq = pad, pad, pad.shape[1]
    else:
        key_valid = torch.cat([pad, torch.ones(2, c["lq"], dtype=torch.bool)], 1)
        query_valid, lq = None, c["lq"]
    lk = key_valid.shape[1]
    q = torch.randn(2, c["hq"], lq, d)
    k, v = torch.randn(2, c["hkv"], lk, d), torch.randn(2, c["hkv"], lk, d)
    out = torch.ops.quantvla.attention(q, k, v, key_valid, query_valid, d ** -0.5, "auto")
    ref = math_attention(q, k, v, key_valid, query_valid, d ** -0.5)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert (out.double() - ref).abs().max().item() < 1e-5
    if c["rows"]:  # a padded query row: the mean of all values, as openpi's finite mask gives
        i = int((~query_valid[1]).nonzero()[0])
        mean = v[1].double().mean(1).repeat_interleave(c["hq"] // c["hkv"], 0)
        torch.testing.assert_close(out[1, :, i].double(), mean, atol=1e-5, rtol=0)


def test_batch_with_no_visible_key_is_uniform_and_nothing_else_leaks():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    key_valid = torch.tensor([[True, False, True, False, False], [False] * 5])
    out = torch.ops.quantvla.attention(q, k, v, key_valid, None, 0.3, "reference")
    torch.testing.assert_close(out[1], v[1].mean(1, keepdim=True).expand(2, 3, 8), atol=1e-6, rtol=0)
    # batch 0: changing the values of masked keys changes nothing
    v2 = v.clone()
    v2[0, :, [1, 3, 4]] = 1e3
    torch.testing.assert_close(torch.ops.quantvla.attention(q, k, v2, key_valid, None, 0.3, "reference")[0], out[0])


def test_opcheck():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    kv = torch.rand(2, 6) > 0.3
    qv = torch.rand(2, 3) > 0.3
    torch.library.opcheck(torch.ops.quantvla.attention.default, (q, k, v, kv, qv, 0.35, "auto"))
    torch.library.opcheck(torch.ops.quantvla.attention.default, (q, k, v, None, None, 0.35, "auto"))


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), "not a multiple of 3 KV heads"),
    (dict(key_valid=torch.ones(2, 5, dtype=torch.bool)), r"key_valid must be bool \(B=2, 6\)"),
    (dict(query_valid=torch.ones(2, 3)), "query_valid must be bool"),
    (dict(v=torch.randn(2, 2, 6, 4)), "differ"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8), key_valid=None, query_valid=None)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.quantvla.attention(args["q"], args["k"], args["v"], args["key_valid"], args["query_valid"], 0.3, "auto")


def test_selection_rules():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert auto_choice(cpu, torch.bfloat16, 10, 256) == "reference"
    assert auto_choice(gpu, torch.float32, 10, 256) == "reference"  # Triton dots in fp32 would be tf32
    assert auto_choice(gpu, torch.bfloat16, 768, 72, padded=False) == "torch"  # SigLIP: no padding
    assert auto_choice(gpu, torch.float32, 768, 72, padded=False) == "reference"
    if cannot_run("splitkv", gpu, torch.bfloat16, 256) is None:
        assert auto_choice(gpu, torch.bfloat16, 10, 256) == "splitkv"
        assert auto_choice(gpu, torch.bfloat16, 968, 256) == "splitkv"
    assert "head_dim 512" in cannot_run("flash", gpu, torch.bfloat16, 512)
    assert "bf16/fp16" in cannot_run("splitkv", gpu, torch.float32, 64)
    with pytest.raises(RuntimeError, match="kernel 'splitkv' cannot run on cpu"):
        select.choose("splitkv", cpu, torch.bfloat16, 10, 64)
