"""Numerical helpers shared by the losses."""

import torch


def probabilities(log_probs: torch.Tensor) -> torch.Tensor:
    """``exp`` of log-probabilities normalized over the last dimension, computed as their softmax:
    the same values, and the same gradient through the log-softmax that made them, but exp of values
    below -87 takes a slow path on x86 CPUs (20x slower) where softmax's own kernel does not."""
    return log_probs.softmax(-1)
