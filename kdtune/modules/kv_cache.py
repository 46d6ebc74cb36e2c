"""Key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of past tokens, ``[batch, kv_heads, max_seq_len, head_dim]``.

    Slots fill left to right, the same slots for every row: a forward over ``S`` new tokens writes
    slots ``size .. size+S-1`` and returns the filled prefix ``0 .. size+S-1``. Slots are storage,
    not positions: rows that start at different offsets (left padding) keep their own RoPE
    positions and mask out the slots they must not see.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.size = 0

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        """Forget every token; the stale contents are never read because only filled slots are."""
        self.size = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ``[B, kv_heads, S, head_dim]``; return all filled slots."""
        end = self.size + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_seq_len={self.max_seq_len}")
        self.k_cache[:, :, self.size : end] = k
        self.v_cache[:, :, self.size : end] = v
        self.size = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]
