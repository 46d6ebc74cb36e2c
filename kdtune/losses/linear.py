"""The losses a training step calls, from the models' final hidden states and output weights, in the
form the config picks: ``fused`` (default) never materializes the ``[tokens, vocab]`` logits,
``chunked`` holds the logits of one sequence chunk at a time, ``full`` computes whole logits (the
baseline the others are checked against). All forms give the same values and gradients.

Each term is a sum over the batch's trained tokens divided by ``num_tokens``, the trained tokens of
the whole optimizer step (every micro-batch, every rank): summing a step's micro-batch terms gives
the step's per-token means, whatever the split.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.losses.cross_entropy import CrossEntropyLoss
from kdtune.losses.divergences import Divergence
from kdtune.losses.fused import DEFAULT_CHUNK_SIZE, FusedLinearKDLoss, check_kd_ratio
from kdtune.losses.sparse import TeacherTopK
from kdtune.modules.softcap import softcap

FORMS = ("fused", "chunked", "full")


def _check_form(form: str, num_chunks: int) -> None:
    if form not in FORMS:
        raise KDTuneError(f"loss_form: expected one of {', '.join(FORMS)}, got {form!r}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks <= 0:
        raise KDTuneError(f"loss num_chunks: expected a positive integer, got {num_chunks!r}")


def _logits(hidden: torch.Tensor, weight: torch.Tensor, num_chunks: int | None, cap: float | None):
    """Whole logits, or a list of ``num_chunks`` chunks of them along the sequence, capped by ``cap``."""
    if num_chunks is None:
        return softcap(F.linear(hidden, weight), cap)
    return [softcap(F.linear(chunk, weight), cap) for chunk in hidden.chunk(num_chunks, dim=1)]


class LinearKDLoss(nn.Module):
    """Cross-entropy against the labels and ``divergence`` from the teacher, the two terms a
    distillation step mixes as ``(1 - kd_ratio) * ce + kd_ratio * kd``.

    ``forward(student_hidden [B, S, d_s], student_weight [V, d_s], teacher, teacher_weight, labels
    [B, S], *, kd_ratio, num_tokens, temperature=None)`` → ``(ce, kd)``, both differentiable.
    ``teacher`` is the teacher's final hidden states ``[B, S, d_t]`` (with ``teacher_weight``
    ``[V, d_t]``), its cached top-k (:class:`TeacherTopK`, no weight), or None (``kd`` is then 0).
    ``temperature`` overrides the divergence's for this call (a schedule); a cached teacher holds
    the one temperature it was made at. ``student_softcap`` / ``teacher_softcap`` are the models'
    final-logit caps (``model.args.final_logit_softcapping``): every form caps each model's logits
    before the temperature and the divergence. ``compile``: the fused form's block math through
    ``torch.compile`` (see :class:`FusedLinearKDLoss`).

    The fused form computes the gradient of ``(1 - kd_ratio) * ce + kd_ratio * kd`` in its
    forward pass, so pass the ``kd_ratio`` you mix with (see :class:`FusedLinearKDLoss`); the
    chunked and full forms differentiate whatever you make of the two terms.
    """

    def __init__(self, divergence: Divergence, *, form: str = "fused", chunk_size: int = DEFAULT_CHUNK_SIZE,
                 num_chunks: int = 8, student_softcap: float | None = None, teacher_softcap: float | None = None,
                 compile: bool = False):
        super().__init__()
        _check_form(form, num_chunks)
        self.divergence = copy.copy(divergence)
        self.divergence.reduction = "sum"  # every form divides by the step's token count itself
        self.form, self.num_chunks = form, num_chunks
        self.fused = FusedLinearKDLoss(self.divergence, chunk_size=chunk_size, student_softcap=student_softcap,
                                       teacher_softcap=teacher_softcap, compile=compile)
        self.cross_entropy = CrossEntropyLoss(ignore_index=divergence.ignore_index, reduction="sum",
                                              vocab_size=divergence.vocab_size)

    def forward(self, student_hidden, student_weight, teacher, teacher_weight, labels, *, kd_ratio: float,
                num_tokens: int, temperature: float | None = None):
        if self.form == "fused":
            return self.fused(student_hidden, student_weight, teacher, teacher_weight, labels, kd_ratio=kd_ratio,
                              num_valid_tokens=num_tokens, temperature=temperature)
        check_kd_ratio(kd_ratio)
        chunks = self.num_chunks if self.form == "chunked" else None
        logits = _logits(student_hidden, student_weight, chunks, self.fused.student_softcap)
        ce = self.cross_entropy(logits, labels) / num_tokens
        if teacher is None:
            return ce, torch.zeros_like(ce)
        if isinstance(teacher, TeacherTopK):
            self.fused.check_cache_temperature(temperature)
        else:
            with torch.no_grad():
                teacher = _logits(teacher, teacher_weight, chunks, self.fused.teacher_softcap)
        return ce, self.divergence(logits, teacher, labels, temperature=temperature) / num_tokens


class LinearCrossEntropyLoss(nn.Module):
    """Cross-entropy against the labels from hidden states and the output weight, the loss of
    supervised fine-tuning.

    ``forward(hidden [B, S, d], weight [V, d], labels [B, S], *, num_tokens)`` → the summed token
    losses divided by ``num_tokens``; labels of -100 are not trained. Scored on the weight's whole
    width (padding rows included). ``softcap``: the model's final-logit cap, or None.
    """

    def __init__(self, *, form: str = "fused", chunk_size: int = DEFAULT_CHUNK_SIZE, num_chunks: int = 8,
                 softcap: float | None = None, compile: bool = False):
        super().__init__()
        _check_form(form, num_chunks)
        self.form, self.num_chunks = form, num_chunks
        self.fused = FusedLinearKDLoss(None, chunk_size=chunk_size, student_softcap=softcap, compile=compile)
        self.cross_entropy = CrossEntropyLoss(ignore_index=self.fused.ignore_index, reduction="sum")

    def forward(self, hidden, weight, labels, *, num_tokens: int) -> torch.Tensor:
        if self.form == "fused":
            return self.fused(hidden, weight, None, None, labels, kd_ratio=0.0, num_valid_tokens=num_tokens)[0]
        chunks = self.num_chunks if self.form == "chunked" else None
        logits = _logits(hidden, weight, chunks, self.fused.student_softcap)
        return self.cross_entropy(logits, labels) / num_tokens
