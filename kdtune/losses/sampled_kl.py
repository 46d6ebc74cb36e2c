"""Sampled-token reverse KL: on-policy distillation as a policy gradient (the form of Thinking
Machines' on-policy distillation and the tinker cookbook; Qwen3's report distills alike).

For a completion ``y`` sampled from the student ``q``, each generated token ``y_t`` gets the
advantage ``A_t = log p(y_t) - log q(y_t)`` (the teacher's log-probability minus the student's, no
gradient through it), and the loss is

    loss = -(1 / N) * sum_t  w_t * (A_t - b_t) * log q(y_t),      N = the step's generated tokens,

whose gradient, in expectation over ``y_t ~ q``, is the gradient of the per-token reverse KL
``(1 / N) * sum_t KL(q(.|y_<t) || p(.|y_<t))`` at the sampled prefixes (the score-function identity;
each token's effect on later positions is left out, as in those recipes). Only the teacher's
log-probability of the sampled token is needed, so any teacher that scores tokens serves
(`token_logprobs` of its hidden states here; a served teacher's prompt logprobs alike).

One sampled token per position makes this gradient noisy, and its advantages share a large common
offset (their mean is minus the reverse KL): with ``baseline`` (the default) each token's advantage
has the mean advantage of the *other* sequences of the batch subtracted, which is independent of
the token's own draw and so leaves the expectation unchanged. Even so it needs many tokens a step:
on the tests' tiny models it did not improve the student at 4 or 16 prompts a step and did at 64.

``w_t = q(y_t) / q_b(y_t)`` (no gradient) is the importance weight of a token drawn from another
distribution ``q_b``: the student's at a sampling temperature ``T != 1`` (``q_T``, computed here),
or older weights whose log-probabilities the caller passes. With samples from the current student at
``T = 1`` every weight is exactly 1. Top-k or top-p sampling truncates ``q_b`` in ways these weights
do not model; the recipe refuses them with this estimator.

Log-probabilities are computed a chunk of tokens at a time, and each chunk's ``[tokens, vocab]``
logits are recomputed in backward rather than kept (activation checkpointing), so memory stays
at one chunk's logits.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdtune.losses.fused import DEFAULT_CHUNK_SIZE
from kdtune.losses.token_loss import upcast
from kdtune.modules.softcap import softcap


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None,
                    temperature: float) -> torch.Tensor:
    logits = upcast(softcap(F.linear(hidden, weight), cap))
    if temperature != 1:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_size: int | None = None,
                   softcap_value: float | None = None, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``log softmax(cap(hidden @ weight[:vocab].T) / temperature)[targets]`` per row, in float32 (float64
    stays float64), differentiable, one chunk of ``chunk_size`` rows of logits at a time."""
    weight = weight if vocab_size is None or vocab_size == weight.shape[0] else weight[:vocab_size]
    parts = []
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        args = (hidden[rows], weight, targets[rows], softcap_value, temperature)
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class SampledReverseKLLoss(nn.Module):
    """The policy-gradient loss above from the student's final hidden states and output weight, the
    teacher's log-probabilities of the sampled tokens and the labels (the sampled tokens at the
    positions that predict them; ``ignore_index`` elsewhere). Returns ``(loss, estimate)``: the loss
    to backpropagate and the sampled reverse-KL estimate ``(1 / N) * sum_t w_t (log q - log p)``."""

    def __init__(self, *, vocab_size: int | None = None, softcap_value: float | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, ignore_index: int = -100, baseline: bool = True):
        super().__init__()
        self.baseline = baseline
        self.vocab_size, self.softcap_value, self.chunk_size = vocab_size, softcap_value, chunk_size
        self.ignore_index = ignore_index

    def student_logprobs(self, hidden, weight, labels, *, temperature: float = 1.0) -> torch.Tensor:
        keep = labels != self.ignore_index
        return token_logprobs(hidden[keep], weight, labels[keep], vocab_size=self.vocab_size,
                              softcap_value=self.softcap_value, temperature=temperature, chunk_size=self.chunk_size)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_logprobs: torch.Tensor,
                labels: torch.Tensor, *, num_tokens: int, sampling_temperature: float = 1.0,
                behavior_logprobs: torch.Tensor | None = None):
        """``teacher_logprobs`` and ``behavior_logprobs`` (the sampler's, when it was not the current
        student at ``sampling_temperature``) hold one value per kept token, in the labels' order."""
        log_q = self.student_logprobs(student_hidden, student_weight, labels)
        if log_q.numel() == 0:  # no sampled token here: a zero still connected to the graph, for backward
            zero = student_hidden.sum() * 0 + student_weight.sum() * 0
            return zero, zero.detach()
        with torch.no_grad():
            if behavior_logprobs is None and sampling_temperature != 1:
                behavior_logprobs = self.student_logprobs(student_hidden, student_weight, labels,
                                                          temperature=sampling_temperature)
            current = log_q.detach()
            weight = torch.ones_like(current) if behavior_logprobs is None else \
                (current - behavior_logprobs.to(current.dtype)).exp()
            advantage = teacher_logprobs.to(current.dtype) - current
            baseline = _other_sequences_mean(advantage, labels != self.ignore_index) if self.baseline else 0.0
        loss = -(weight * (advantage - baseline) * log_q).sum() / num_tokens
        return loss, -(weight * advantage).sum() / num_tokens


def _other_sequences_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """For each kept token, the mean of ``values`` over the kept tokens of the *other* sequences of
    the batch: a baseline independent of the token's own draw (and of its sequence's), so subtracting
    it leaves the gradient's expectation unchanged while removing the advantage's common offset."""
    rows = keep.nonzero()[:, 0]
    sums = values.new_zeros(keep.shape[0]).index_add_(0, rows, values)
    counts = torch.bincount(rows, minlength=keep.shape[0]).to(values.dtype)
    others = counts.sum() - counts[rows]
    return torch.where(others > 0, (sums.sum() - sums[rows]) / others.clamp_min(1), torch.zeros_like(values))
