"""Divergences between the teacher's distribution p and the student's q, per token.

Each class defines ``per_token(log_q, log_p)`` on log-probabilities ``[N, K]`` → ``[N]``: the only
place its math lives. The full and chunked forms (``TokenLoss``), the fused form
(``FusedLinearKDLoss``) and the sparse top-k teacher (``TeacherTopK.bucket``, K = k + 1) all call it.

Conventions: values are true divergences (forward KL includes the teacher-entropy term, so a
perfect student scores 0). ``temperature`` divides both models' logits and the result is *not*
multiplied by T², as in TRL and Liger. Arithmetic is float32 whatever the input dtype. Entries
with probability 0 (logits at -inf, e.g. masked vocabulary) contribute 0 and never produce NaN,
in values or gradients; the teacher is a constant (no gradient).
"""

import torch

from kdtune.errors import KDTuneError
from kdtune.losses.sparse import TeacherTopK
from kdtune.losses.numerics import probabilities
from kdtune.losses.token_loss import TokenLoss, upcast


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row; terms where a = 0 are 0 (masked before the product, so no 0·inf NaN)."""
    a = probabilities(log_a)
    return (a * (log_a - log_b).masked_fill(a == 0, 0.0)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1 − w)·b), exact copies at w = 0 and 1.

    Mixed in probability space; the clamp only touches entries where both probabilities are below
    float32's smallest normal, whose KL terms are 0, and keeps log's gradient finite there.
    """
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    mix = w * probabilities(log_a) + (1 - w) * probabilities(log_b)
    return mix.clamp_min(torch.finfo(mix.dtype).tiny).log()


def _check_weight(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise KDTuneError(f"loss {name}: expected a value in [0, 1], got {value!r}")
    return float(value)


def _scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1 else logits / temperature


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise KDTuneError(f"loss temperature: expected a positive number, got {value!r}")
    return float(value)


class Divergence(TokenLoss):
    """D(p_teacher, q_student) averaged over valid tokens; see the module docstring for conventions.

    ``forward(student_logits, teacher, labels)``: ``teacher`` is dense logits or a
    :class:`TeacherTopK` (sparse, offline); full tensors or lists of sequence chunks.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 vocab_size: int | None = None):
        super().__init__(ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size)
        self.temperature = _check_temperature(temperature)

    def per_token(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_values(self, student_logits: torch.Tensor, teacher, targets=None, *,
                     temperature: float | None = None, student_log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token divergences; ``temperature`` (default: the loss's own) divides both logits.
        ``student_log_probs``: the student's log-softmax at temperature 1 when the caller has it
        already (the fused loss shares it with cross-entropy), used when the temperature is 1."""
        t = self.temperature if temperature is None else _check_temperature(temperature)
        log_q = student_log_probs if student_log_probs is not None and t == 1 else \
            _scale(student_logits, t).log_softmax(-1)
        if isinstance(teacher, TeacherTopK):
            log_q, log_p = teacher.bucket(log_q)
        else:
            log_p = _scale(upcast(teacher.detach()).to(log_q.dtype), t).log_softmax(-1)
        return self.per_token(log_q, log_p)


class ForwardKLLoss(Divergence):
    """KL(p || q) = Σ p (log p − log q): mass-covering; the classic distillation loss."""

    def per_token(self, log_q, log_p):
        return _kl(log_p, log_q)

    @torch.no_grad()
    def sum_and_probs(self, student_logits, teacher_logits, *, temperature: float | None = None,
                      student_log_probs=None, student_probs=None):
        """``(total, q_T, p_T)``: the summed divergence of dense logits, and the two tempered
        distributions, from which its gradient with respect to the student's logits is
        ``(q_T - p_T) / T`` in closed form. The fused loss uses it in place of autograd (a few passes
        over each ``[rows, V]`` block instead of dozens); tests hold it to autograd on ``per_token``.
        Logits may be bf16: the math is float32 (float64 stays float64)."""
        t = self.temperature if temperature is None else _check_temperature(temperature)
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        if t == 1 and student_log_probs is not None:
            log_q, q = student_log_probs, student_probs
        else:
            scaled = _scale(student_logits, t)
            log_q, q = scaled.log_softmax(-1, dtype=dtype), scaled.softmax(-1, dtype=dtype)
        scaled = _scale(teacher_logits.detach(), t)
        # softmax, not exp(log_p): see `probabilities`
        log_p, p = scaled.log_softmax(-1, dtype=dtype), scaled.softmax(-1, dtype=dtype)
        terms = log_p.sub_(log_q)
        total = torch.vdot(p.reshape(-1), terms.reshape(-1))  # one read of each, no product tensor
        if torch.isnan(total):  # entries with p = 0 and log p = -inf count 0, not NaN
            total = terms.mul_(p).nansum()
        return total, q, p


class ReverseKLLoss(Divergence):
    """KL(q || p) = Σ q (log q − log p): mode-seeking."""

    def per_token(self, log_q, log_p):
        return _kl(log_q, log_p)


class GeneralizedJSDLoss(Divergence):
    """Generalized JSD of the GKD paper, as TRL computes it.

    m = beta·p + (1 − beta)·q; loss = beta·KL(p || m) + (1 − beta)·KL(q || m). As in TRL the endpoints
    are defined as the limits' useful forms: beta = 0 is forward KL(p || q) and beta = 1 is reverse
    KL(q || p) exactly (the formula itself tends to 0 there).
    """

    def __init__(self, beta: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.beta = _check_weight("beta", beta)

    def per_token(self, log_q, log_p):
        if self.beta == 0:
            return _kl(log_p, log_q)
        if self.beta == 1:
            return _kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, self.beta)
        return self.beta * _kl(log_p, log_m) + (1 - self.beta) * _kl(log_q, log_m)


class SkewForwardKLLoss(Divergence):
    """Skew KL of DistiLLM: KL(p || alpha·p + (1 − alpha)·q); finite even where q = 0."""

    def __init__(self, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _check_weight("alpha", alpha)

    def per_token(self, log_q, log_p):
        return _kl(log_p, _log_mix(log_p, log_q, self.alpha))


class SkewReverseKLLoss(Divergence):
    """Skew reverse KL of DistiLLM: KL(q || alpha·q + (1 − alpha)·p)."""

    def __init__(self, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _check_weight("alpha", alpha)

    def per_token(self, log_q, log_p):
        return _kl(log_q, _log_mix(log_q, log_p, self.alpha))


class TVDLoss(Divergence):
    """Total variation distance 0.5·Σ |p − q|."""

    def per_token(self, log_q, log_p):
        return 0.5 * (probabilities(log_p) - probabilities(log_q)).abs().sum(-1)
