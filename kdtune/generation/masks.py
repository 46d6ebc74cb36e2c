"""Attention masks and RoPE positions for left-padded rows, shared by generation and by the
forward that scores generated sequences."""

from __future__ import annotations

import torch


def padded_positions(real: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[B, L]`` that restart at 0 on each row's first real token.

    ``real`` ``[B, L]`` is True on real tokens. Padding takes the position of the real token
    before it (0 at the left edge); nothing attends to it, so its position does not matter.
    """
    return (real.long().cumsum(-1) - 1).clamp(min=0)


def padded_attention_mask(real: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows ``start:end`` of the causal mask that hides padding: ``[B, end - start, end]``.

    Query ``q`` may attend key ``k`` when ``k <= q`` and ``k`` is real, and always itself, so a
    padding query still has one slot to attend (a row with none gives NaN on some kernels).
    The slice lets a KV-cached forward over queries ``start:end`` build only the rows it needs.
    """
    end = real.shape[1] if end is None else end
    queries = torch.arange(start, end, device=real.device)[:, None]
    keys = torch.arange(end, device=real.device)[None, :]
    return ((keys <= queries) & real[:, None, :end]) | (keys == queries)
