"""Grouped-query self-attention: PyTorch's fused SDPA, or explicit scores where Gemma 2 caps them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.modules.kv_cache import KVCache
from kdtune.modules.rmsnorm import RMSNorm
from kdtune.modules.rope import apply_rope
from kdtune.modules.softcap import softcap


class Attention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` shared key/value heads (GQA).

    Variants: ``qkv_bias`` (Qwen2, Llama's ``attention_bias``), ``o_bias`` (``attention_bias``),
    ``qk_norm`` (Qwen3, Gemma 3: an RMSNorm over each head of q and k before RoPE; ``unit_offset``
    for Gemma's), ``scale`` of the scores (default ``head_dim ** -0.5``), ``logit_softcap`` (Gemma 2:
    ``cap * tanh(scores / cap)`` before the mask and softmax), ``fused_qkv`` (Phi-3's ``qkv_proj``).
    ``head_dim`` is explicit because Qwen3 and Gemma do not derive it from ``hidden_size / num_heads``.
    Sliding windows are the caller's mask.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        unit_offset: bool = False,
        scale: float | None = None,
        logit_softcap: float | None = None,
        fused_qkv: bool = False,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.logit_softcap = logit_softcap
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        if fused_qkv:
            self.qkv_proj = nn.Linear(dim, q + 2 * kv, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, q, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv, bias=qkv_bias)
        self.o_proj = nn.Linear(q, dim, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps, unit_offset=unit_offset)
            self.k_norm = RMSNorm(head_dim, norm_eps, unit_offset=unit_offset)
        self.kv_cache: KVCache | None = None

    def _project(self, x: torch.Tensor):
        if hasattr(self, "qkv_proj"):
            kv = self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split((self.num_heads * self.head_dim, kv, kv), dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` ``[B, S, dim]``; ``mask`` ``[B, S, S_kv]`` (True = may attend) or None for causal.

        With a KV cache the keys span every filled cache slot and ``mask`` must be given.
        """
        b, s, _ = x.shape
        q, k, v = self._project(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v)
        if self.logit_softcap is None:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if mask is None else mask.unsqueeze(1),
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        else:
            out = self._capped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _capped_attention(self, q, k, v, mask):
        """Softcapped scores (SDPA has no hook between scores and softmax); softmax in float32.
        Queries are grouped by their key/value head, so keys and values are never repeated."""
        b, _, s, d = q.shape
        q = q.view(b, self.num_kv_heads, -1, s, d)
        scores = softcap((q @ k.unsqueeze(2).transpose(-1, -2)) * self.scale, self.logit_softcap)
        if mask is None:
            mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - s)
        else:
            mask = mask[:, None, None]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return (weights @ v.unsqueeze(2)).view(b, self.num_heads, s, d)
