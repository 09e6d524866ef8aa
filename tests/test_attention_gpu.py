"""quantvla::attention on the GPU at Pi0.5's shapes: every Triton kernel in bf16 against the fp32
reference (SDPA math), with a masked camera, prompt padding, batch 2 with different prompt
lengths, padded query rows and a batch row that sees nothing. Skips without CUDA."""
import pytest
import torch
from torchao.quantization.utils import compute_error

import quantvla_fx.ops  # noqa: F401

if not torch.cuda.is_available():  # skip before importing the Triton kernels (no triton on CPU wheels)
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")
from quantvla_fx.kernels.attention import reference, triton_flash, triton_splitkv  # noqa: E402

IMAGE, PROMPT = 256, 200  # Pi0.5 libero: 3 cameras x 256 tokens + 200 prompt tokens = 968


def prefix_pad(prompt_lens, masked_camera):
    rows = []
    for n, cam in zip(prompt_lens, masked_camera):
        cams = [torch.full((IMAGE,), c != cam) for c in range(3)]
        rows.append(torch.cat(cams + [torch.arange(PROMPT) < n]))
    return torch.stack(rows).cuda()


# name: (B, Hq, Hkv, Lq or None for the prefix, D, kernels)
SHAPES = {
    "expert_q10": (2, 8, 1, 10, 256, ("splitkv", "flash")),
    "expert_q50": (2, 8, 1, 50, 256, ("splitkv", "flash")),
    "prefix_968": (2, 8, 1, None, 256, ("flash", "splitkv")),
}
IMPL = {"splitkv": triton_splitkv.attention, "flash": triton_flash.attention}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_pi05_shapes_bf16_vs_fp32_reference(name):
    b, hq, hkv, lq, d, kernels = SHAPES[name]
    torch.manual_seed(0)
    pad = prefix_pad((48, 7), (1, None))  # row 0: middle camera masked; different prompt lengths
    if lq is None:
        kv, qv, lq = pad, pad, pad.shape[1]
    else:
        kv, qv = torch.cat([pad, torch.ones(b, lq, dtype=torch.bool, device="cuda")], 1), None
    lk = kv.shape[1]
    q = torch.randn(b, lq, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
    ref = reference.attention(q.float(), k.float(), v.float(), kv, qv, d ** -0.5)
    for kern in kernels:
        out = IMPL[kern](q, k, v, kv, qv, d ** -0.5)
        assert out.dtype == torch.bfloat16 and out.shape == (b, hq, lq, d)
        sqnr = compute_error(ref, out.float()).item()
        assert sqnr >= 40, (kern, sqnr)
    auto = torch.ops.quantvla.attention(q, k, v, kv, qv, d ** -0.5, "auto")
    assert compute_error(ref, auto.float()).item() >= 40
    if qv is not None:  # a padded prefix row is the mean of all values
        i = int((~qv[1]).nonzero()[0])
        mean = v[1].float().mean(1).expand(hq, d)
        torch.testing.assert_close(auto[1, :, i].float(), mean, atol=2e-2, rtol=0)


def test_splitkv_merge_and_a_row_that_sees_nothing():
    torch.manual_seed(1)
    q = torch.randn(2, 8, 10, 256, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1, 978, 256, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 1, 978, 256, device="cuda", dtype=torch.bfloat16)
    kv = torch.rand(2, 978, device="cuda") > 0.5
    kv[1] = False
    ref = reference.attention(q.float(), k.float(), v.float(), kv, None, 1 / 16)
    for splits in (1, 2, 7, 31):
        out = triton_splitkv.attention(q, k, v, kv, None, 1 / 16, splits=splits)
        assert compute_error(ref, out.float()).item() >= 40, splits
        torch.testing.assert_close(out[1].float(), v[1].float().mean(1, keepdim=True).expand(8, 10, 256), atol=2e-2, rtol=0)


def test_siglip_shape_padded_head_dim():
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 16, 256, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = reference.attention(q.float(), k.float(), v.float(), None, None, 72 ** -0.5)
    for choice in ("auto", "torch", "flash", "splitkv"):  # auto: PyTorch's fused SDPA (no padding)
        out = torch.ops.quantvla.attention(q, k, v, None, None, 72 ** -0.5, choice)
        assert compute_error(ref, out.float()).item() >= 40, choice
    with pytest.raises(RuntimeError, match="only calls without padding"):
        torch.ops.quantvla.attention(q, k, v, torch.ones(3, 256, dtype=torch.bool, device="cuda"), None, 0.1, "torch")


def test_compiled_module_on_gpu_uses_the_op():
    import torch.nn.functional as F

    from quantvla_fx import QuantVLAConfig
    from quantvla_fx.backend import report_book

    def f(q, k, v, kv):
        mask = torch.where(kv[:, None, None, :], 0.0, -2.3819763e38).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    torch.manual_seed(3)
    q = torch.randn(1, 8, 10, 256, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 978, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kv = torch.rand(1, 978, device="cuda") > 0.2
    with torch.no_grad():
        out = torch.compile(f, backend="quantvla", options=QuantVLAConfig().to_options())(q, k, v, kv)
    rec, = report_book(None).graphs[-1].attention
    assert rec.rewritten
    ref = reference.attention(q.float(), k.float(), v.float(), kv, None, 1 / 16)
    assert compute_error(ref, out.float()).item() >= 40
