"""Rotary position embeddings (RoPE), with the frequency scalings of Llama 3.1 (``llama3``),
Gemma 3's global layers (``linear``) and Phi-3.5 (``longrope``).

Angles are computed from explicit position ids on every call, so packed rows (positions restarting
at 0 per sample) and left-padded generation (a different offset per row) need nothing special.
The rotation pairs dimension ``i`` with ``i + head_dim/2`` ("rotate half"), the layout Hugging Face
checkpoints store their q/k projections in.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, *, long: bool = False) -> torch.Tensor:
    """The ``head_dim/2`` inverse frequencies ``theta^(-2i/head_dim)``, in float32, scaled by ``scaling``
    (a dict with ``rope_type``):

    - ``llama3``: wavelengths longer than ``original/low_freq_factor`` are stretched by ``factor``,
      those shorter than ``original/high_freq_factor`` are kept, and the band between is
      interpolated linearly in ``original/wavelength``;
    - ``linear``: every frequency divided by ``factor``;
    - ``longrope``: frequency ``i`` divided by ``short_factor[i]``, or ``long_factor[i]`` when ``long``
      (sequences beyond ``original_max_position_embeddings``).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = None if scaling is None else scaling["rope_type"]
    if kind is None:
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        if len(factors) != len(inv_freq):
            raise ValueError(f"longrope: {len(factors)} factors for {len(inv_freq)} frequencies")
        return inv_freq / torch.tensor(factors, dtype=torch.float32)
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # 0 for long wavelengths (fully scaled), 1 for short ones (kept), linear in between.
    keep = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - keep) * inv_freq / factor + keep * inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, heads, head_dim]`` by angles whose cos/sin are ``[B, S, head_dim]``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Maps position ids ``[B, S]`` to the (cos, sin) pair every attention layer shares.

    The inverse frequencies are a cache, not state: they are recomputed for whatever device the
    positions are on, so a model built on the meta device and then loaded needs no extra step.
    LongRoPE switches to its long factors when a forward reaches past the original context (its
    largest position id, as transformers decides) and scales cos and sin by its attention factor.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._inv_freq: dict[tuple, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        longrope = self.scaling is not None and self.scaling["rope_type"] == "longrope"
        long = longrope and int(positions.max()) + 1 > self.scaling["original_max_position_embeddings"]
        key = (positions.device, long)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_frequencies(self.head_dim, self.theta, self.scaling, long=long).to(positions.device)
        angles = positions.float().unsqueeze(-1) * self._inv_freq[key]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if longrope:
            cos, sin = cos * self.scaling["attention_factor"], sin * self.scaling["attention_factor"]
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"
