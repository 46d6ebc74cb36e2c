"""Textbook divergences in float64 numpy, written with probabilities and explicit sums.

Deliberately independent of kdtune's log-space code: terms with zero weight are skipped by the
0·log 0 = 0 convention, mixtures are built from probabilities, endpoints of JSD use the TRL
convention (beta=0: KL(p||q), beta=1: KL(q||p)).
"""

import numpy as np


def softmax(logits, temperature=1.0):
    x = np.asarray(logits, dtype=np.float64) / temperature
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def kl(a, b):
    total = 0.0
    for ai, bi in zip(a, b):
        if ai > 0:
            total += ai * (np.log(ai) - np.log(bi))
    return total


def divergence(name, p, q, **kw):
    """One token's divergence D(p_teacher, q_student)."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        beta = kw["beta"]
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    if name == "skew_reverse_kl":
        return kl(q, kw["alpha"] * q + (1 - kw["alpha"]) * p)
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    raise ValueError(name)


def mean_loss(name, student_logits, teacher_logits, labels, temperature=1.0, **kw):
    """Mean over tokens whose label is not -100 of the divergence, rows given as [N, V]."""
    values = [
        divergence(name, softmax(t, temperature), softmax(s, temperature), **kw)
        for s, t, y in zip(student_logits, teacher_logits, labels)
        if y != -100
    ]
    return sum(values) / len(values)


def mean_cross_entropy(student_logits, labels):
    values = [-np.log(softmax(s)[y]) for s, y in zip(student_logits, labels) if y != -100]
    return sum(values) / len(values)
