"""Gemma decoder stack as openpi's patched transformers runs it for Pi0.5.

- RMSNorm in fp32 with a ``(1 + w)`` scale (LM), or adaRMS (expert): scale/shift/gate from a
  ``dense`` Linear on the time condition, with a gated residual.
- Attention: RoPE, grouped/multi-query K/V, SDPA with openpi's finite additive mask (openpi
  runs HF's eager matmul/softmax; same math, the results agree to fp32 rounding).
- MLP: GeGLU with tanh GELU.
Module and attribute names equal HF/openpi's so state-dict keys and FQN regexes carry over.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig
from .rope import apply_rope, rope_cos_sin

KVPair = tuple[torch.Tensor, torch.Tensor]


class GemmaRMSNorm(nn.Module):
    """``forward(x, cond) -> (y, gate)``. Plain: ``y = rms(x)·(1+w)``, gate None.
    Adaptive (``cond_dim`` set): ``scale, shift, gate = chunk(dense(cond), 3)``,
    ``y = rms(x)·(1+scale) + shift``. The arithmetic is fp32; y and gate return in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: Optional[int] = None):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.cond_dim = cond_dim
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim, bias=True)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps)  # promotes to fp32

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None):
        dtype = x.dtype
        normed = self._norm(x)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs the time condition (adarms_cond)")
        modulation = self.dense(cond.to(self.dense.weight.dtype))
        if x.ndim == 3:
            modulation = modulation.unsqueeze(1)
        scale, shift, gate = torch.chunk(modulation, 3, dim=-1)
        normed = normed * (1 + scale.float()) + shift.float()
        return normed.to(dtype), gate.to(dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


def fold_mask_for_kv_groups(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, 1, Lq, Lk) additive mask -> (B, 1, groups*Lq, Lk), matching ``attention``'s folded
    query rows. Done once per stack, not per layer."""
    return mask if groups == 1 else mask.repeat(1, 1, groups, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, folded_mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); folded_mask: additive (B, 1, (Hq/Hkv)*Lq, Lk).
    Returns (B, Lq, Hq, D).

    The query heads that share a K/V head (head h uses K/V head h // (Hq/Hkv), like HF's
    repeat_kv) are folded into the query-row axis, so K/V are never copied per head; one SDPA
    call then covers LM and expert (MQA: Hkv = 1). With openpi's finite mask value a fully
    masked (padded) query row gets a uniform softmax, as in openpi's eager path.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, (hq // hkv) * lq, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=folded_mask.to(q.dtype), scale=scaling)
    return out.reshape(b, hq, lq, d).transpose(1, 2)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def forward(self, x, cos, sin, mask, past_kv: Optional[KVPair] = None):
        """``mask``: folded additive mask (see ``fold_mask_for_kv_groups``). Returns (output,
        (k, v)) where k/v are this call's own post-RoPE keys/values (B, Hkv, L, D). ``past_kv``
        is prepended for attention but never written to."""
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        k_all, v_all = k, v
        if past_kv is not None:
            k_all = torch.cat([past_kv[0], k], dim=2)
            v_all = torch.cat([past_kv[1], v], dim=2)
        out = attention(q, k_all, v_all, mask, self.scaling)
        out = out.reshape(b, length, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, eps: float, cond_dim: Optional[int]):
        super().__init__()
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg.width, eps, cond_dim)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.width, eps, cond_dim)

    def forward(self, x, cos, sin, mask, past_kv: Optional[KVPair] = None, cond=None):
        h, gate = self.input_layernorm(x, cond)
        h, kv = self.self_attn(h, cos, sin, mask, past_kv)
        x = gated_residual(x, h, gate)
        h, gate = self.post_attention_layernorm(x, cond)
        h = self.mlp(h)
        return gated_residual(x, h, gate), kv


class GemmaModel(nn.Module):
    """HF ``GemmaModel`` minus its own embedding scaling (openpi scales in ``embed_prefix``)."""

    def __init__(self, cfg: GemmaConfig, eps: float, rope_theta: float, vocab_size: Optional[int],
                 cond_dim: Optional[int]):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.kv_groups = cfg.num_heads // cfg.num_kv_heads
        self.rope_theta = rope_theta
        self.embed_tokens = nn.Embedding(vocab_size, cfg.width) if vocab_size is not None else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, eps, cond_dim) for _ in range(cfg.depth))
        self.norm = GemmaRMSNorm(cfg.width, eps, cond_dim)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.q_proj.weight.dtype

    def forward(self, inputs_embeds, position_ids, mask, past_key_values: Optional[list[KVPair]] = None, cond=None):
        """``mask``: additive (B, 1, L, L_past + L) float32. Returns (normed hidden states, list
        of this pass's per-layer post-RoPE (k, v)).

        Hidden states are cast to the layers' dtype like openpi's patched GemmaModel (bf16
        layers -> bf16 activations); RoPE cos/sin are cast to the same dtype, as HF does."""
        x = inputs_embeds.to(self.compute_dtype)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        mask = fold_mask_for_kv_groups(mask, self.kv_groups).to(x.dtype)  # once per stack, not per layer
        new_kv: list[KVPair] = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, kv = layer(x, cos, sin, mask, past, cond)
            new_kv.append(kv)
        x, _ = self.norm(x, cond)
        return x, new_kv


class GemmaForCausalLM(nn.Module):
    """The action expert container: ``model`` + an (unused at inference) ``lm_head``."""

    def __init__(self, cfg: GemmaConfig, eps: float, rope_theta: float, vocab_size: int, cond_dim: Optional[int]):
        super().__init__()
        self.model = GemmaModel(cfg, eps, rope_theta, vocab_size=None, cond_dim=cond_dim)  # openpi: embed_tokens = None
        self.lm_head = nn.Linear(cfg.width, vocab_size, bias=False)
