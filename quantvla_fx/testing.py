"""Small Gemma-style models for tests, examples and benchmarks (no checkpoint needed).

Module names follow Gemma/openpi (``layers.N.mlp.gate_proj`` …) so the default selection rules
and DuQuant's group structure (q/k/v share an input, gate/up share an input) apply unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GemmaRMSNorm(nn.Module):
    """RMSNorm with Gemma's (1 + w) scale, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dt)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.to(dt))).to(x.dtype)


class NormLinear(nn.Module):
    """RMSNorm -> linear: the smallest pattern whose activation quantization should fuse into the norm."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.norm = GemmaRMSNorm(k)
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(self.norm(x))


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True)
        return self.o_proj(att.transpose(1, 2).reshape(b, t, -1))


class ToyGeGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class ToyGemmaLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(dim)
        self.self_attn = ToyAttention(dim, heads, head_dim)
        self.post_attention_layernorm = GemmaRMSNorm(dim)
        self.mlp = ToyGeGLU(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ToyGemma(nn.Module):
    """A stack of Gemma decoder layers on hidden states ([B, T, dim] -> [B, T, dim])."""

    def __init__(self, dim=64, hidden=128, layers=2, heads=2, head_dim=32, graph_break_in_loop=False):
        super().__init__()
        self.layers = nn.ModuleList(ToyGemmaLayer(dim, hidden, heads, head_dim) for _ in range(layers))
        self.norm = GemmaRMSNorm(dim)
        self.graph_break_in_loop = graph_break_in_loop

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
            if self.graph_break_in_loop:
                torch._dynamo.graph_break()
        return self.norm(x)


def init_toy_gemma(model: nn.Module, seed: int = 0, norm_std: float = 0.1) -> nn.Module:
    """Gaussian weights (std 1/sqrt(fan_in)) and small random norm weights, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * norm_std)
    return model


def inject_outlier_channels(model: nn.Module, channels=(3, 17, 40), factor: float = 80.0) -> nn.Module:
    """Make a few hidden channels 50-100x larger after every norm, as real VLA activations show."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, GemmaRMSNorm) and name.endswith("layernorm"):
                for c in channels:
                    mod.weight[c] = factor * (1.0 + mod.weight[c]) - 1.0
    return model
