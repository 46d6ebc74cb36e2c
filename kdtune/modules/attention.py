"""Grouped-query self-attention of Llama 3, Qwen2/2.5 and Qwen3 through PyTorch's fused SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.modules.kv_cache import KVCache
from kdtune.modules.rmsnorm import RMSNorm
from kdtune.modules.rope import apply_rope


class Attention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` shared key/value heads (GQA).

    Variants: ``qkv_bias`` (Qwen2, Llama's ``attention_bias``), ``o_bias`` (``attention_bias``),
    ``qk_norm`` (Qwen3: an RMSNorm over each head of q and k before RoPE). ``head_dim`` is explicit
    because Qwen3 does not derive it from ``hidden_size / num_heads``.
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
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` ``[B, S, dim]``; ``mask`` ``[B, S, S_kv]`` (True = may attend) or None for causal.

        With a KV cache the keys span every filled cache slot and ``mask`` must be given.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
