"""Random float64 inputs of the losses that project hidden states: both models' final hidden states
and output weights (the student's requiring gradients) and labels with some ignored positions."""

import torch


def random_heads(b, s, v, d_s, d_t, *, seed, ignored):
    """``(hidden [b, s, d_s], weight [v, d_s], t_hidden [b, s, d_t], t_weight [v, d_t], labels [b, s])``;
    ``ignored = (row, n)`` sets that row's first ``n`` labels to -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(b, s, d_t, generator=g, dtype=torch.float64)
    t_weight = torch.randn(v, d_t, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s), generator=g)
    row, n = ignored
    labels[row, :n] = -100
    return hidden, weight, t_hidden, t_weight, labels
