"""Logit softcapping: ``cap * tanh(x / cap)``, Gemma 2's bound on attention scores and final logits.

It is close to the identity for ``|x|`` well below ``cap`` and saturates at ``±cap``; its derivative
is ``1 - tanh(x / cap)^2 = 1 - (capped / cap)^2``.
"""

import torch


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``x`` unchanged when ``cap`` is None, else ``cap * tanh(x / cap)`` in ``x``'s dtype."""
    return x if cap is None else torch.tanh(x / cap) * cap


def softcap_(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`softcap` in place (no autograd): one buffer instead of two temporaries."""
    return x if cap is None else x.div_(cap).tanh_().mul_(cap)
