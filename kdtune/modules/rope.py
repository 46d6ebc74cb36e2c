"""Rotary position embeddings (RoPE), including Llama 3.1's long-context frequency scaling.

Angles are computed from explicit position ids on every call, so packed rows (positions restarting
at 0 per sample) and left-padded generation (a different offset per row) need nothing special.
The rotation pairs dimension ``i`` with ``i + head_dim/2`` ("rotate half"), the layout Hugging Face
checkpoints store their q/k projections in.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The ``head_dim/2`` inverse frequencies ``theta^(-2i/head_dim)``, in float32.

    ``scaling`` is a Llama 3 ``rope_scaling`` dict (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``): wavelengths longer than
    ``original/low_freq_factor`` are stretched by ``factor``, those shorter than
    ``original/high_freq_factor`` are kept, and the band between is interpolated linearly in
    ``original/wavelength``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
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
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._inv_freq: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling).to(positions.device)
        angles = positions.float().unsqueeze(-1) * self._inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"
