"""Distillation losses between models whose tokenizers differ: ULD and the GOLD-style hybrid.

The student's and the teacher's sequences are aligned into spans that cover the same characters
(`kdtune.tokenization.alignment`): student tokens ``a_1..a_m`` ~ teacher tokens ``b_1..b_n``. Each
side scores a span by one vector over its vocabulary, the distribution that predicts the span's first
token scaled by the probability of the rest of the span as it was written::

    v_s(x) = q(x | ctx) * prod_{k=2..m} q(a_k | ctx, a_1..a_{k-1})        (the teacher's v_t alike)

so ``v_s(a_1)`` is the student's joint probability of the whole span; a one-token span's vector is
its distribution. Probabilities are at the loss's temperature (logits divided by it on both sides,
no T^2 factor), the conditionals of later tokens too. The vectors are not renormalized.

- ``uld`` (Universal Logit Distillation, Boizard et al. 2024): the L1 distance between the two
  vectors sorted in decreasing order, the shorter vocabulary padded with zeros.
- ``hybrid_uld`` (as TRL's GOLD trainer combines them): tokens spelled the same in both vocabularies
  (compared as bytes, so byte-level ``Ġ`` and sentencepiece ``▁`` spellings meet; the two end-of-turn
  tokens are paired too) are compared id to id by the generalized KL of unnormalized measures,
  ``sum p log(p / q) - p + q`` (zero only when they are equal), and the rest of each vocabulary by
  ULD on its sorted values; ``matched_weight`` (default: the matched share of the teacher's
  vocabulary) weighs the first, ``1 - matched_weight`` the second.

A span's value counts once for each student token in it, and the sum is divided by ``num_tokens``
(the step's trained student tokens), so the term is a mean over the student's tokens like the
cross-entropy it is mixed with: ``(1 - kd_ratio) * CE + kd_ratio * KD``. The spans are processed a
chunk at a time, each chunk's ``[spans, vocab]`` logits recomputed in backward rather than kept,
so neither model's ``[tokens, vocab]`` logits ever exist whole.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdtune.errors import KDTuneError
from kdtune.losses.divergences import _check_temperature, _check_weight
from kdtune.losses.linear import LinearCrossEntropyLoss
from kdtune.losses.sparse import TeacherTopK
from kdtune.losses.token_loss import upcast
from kdtune.modules.softcap import softcap


@dataclass
class AlignedTeacher:
    """The teacher's side of a cross-tokenizer batch: its final hidden states ``[B, T, d_t]`` over its
    own tokens ``[B, T]``, and the aligned spans ``[N, 5]``: batch row, student tokens ``[s0, s1)``,
    teacher tokens ``[t0, t1)`` (token indices; the first token of each is predicted at ``s0 - 1``
    and ``t0 - 1``). A top-k teacher (served) gives, in place of hidden states and tokens, its rows
    ``hidden`` as a `TeacherTopK` ``[B, T, k]`` and ``token_logprobs`` ``[B, T]``, the
    log-probability at each position of the teacher token after it."""

    hidden: object
    tokens: torch.Tensor | None
    spans: torch.Tensor
    token_logprobs: torch.Tensor | None = None

    def to(self, device) -> "AlignedTeacher":
        move = (lambda t: None if t is None else t.to(device))
        hidden = TeacherTopK(move(self.hidden.logprobs), move(self.hidden.ids)) \
            if isinstance(self.hidden, TeacherTopK) else move(self.hidden)
        return AlignedTeacher(hidden, move(self.tokens), move(self.spans), move(self.token_logprobs))


def later_tokens(start: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For spans of tokens ``[start, stop)``: each later token's span (an index into the spans) and
    the position that predicts it (``start``, ``start + 1``, ... up to ``stop - 2``)."""
    extra = stop - start - 1
    span = torch.repeat_interleave(torch.arange(len(start), device=start.device), extra)
    within = torch.arange(len(span), device=start.device) - torch.repeat_interleave(extra.cumsum(0) - extra, extra)
    return span, start[span] + within


def span_log_vectors(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                     start: torch.Tensor, stop: torch.Tensor, *, temperature: float, cap: float | None) -> torch.Tensor:
    """``log v`` ``[n, V]`` of the spans of tokens ``[start, stop)`` in batch ``rows``: the tempered
    log-distribution at ``start - 1`` plus the log-probabilities of the span's later tokens, read
    from ``targets`` (``targets[b, p]`` is the token at ``p + 1``: the labels, on the student's side)."""
    first = upcast(softcap(F.linear(hidden[rows, start - 1], weight), cap)) / temperature
    log_v = first.log_softmax(-1)
    span, position = later_tokens(start, stop)
    if len(span) == 0:
        return log_v
    later = upcast(softcap(F.linear(hidden[rows[span], position], weight), cap)) / temperature
    token_log_p = later.log_softmax(-1).gather(-1, targets[rows[span], position][:, None])[:, 0]
    return log_v + torch.zeros(len(rows), dtype=log_v.dtype, device=log_v.device).index_add(0, span, token_log_p)[:, None]


def sorted_l1(a: torch.Tensor, b: torch.Tensor, b_tail: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, ``sum |sort(a) - sort(b)|`` (decreasing), the narrower one padded with zeros. With
    ``b_tail`` (``b`` holds a top-k teacher's values, the rest of its mass unknown) the entries of
    ``a`` past b's width are compared as one sum with ``b_tail``: a lower bound of the distance
    (the triangle inequality), exact when the tail is empty."""
    a, b = a.sort(-1, descending=True).values, b.sort(-1, descending=True).values
    width = min(a.shape[-1], b.shape[-1])
    head = (a[:, :width] - b[:, :width]).abs().sum(-1) + b[:, width:].sum(-1)
    if b_tail is None:
        return head + a[:, width:].sum(-1)
    return head + (a[:, width:].sum(-1) - b_tail).abs()


class CrossTokenizerLoss(nn.Module):
    """The base of ULD-style losses. ``forward(student_hidden, student_weight, teacher: AlignedTeacher,
    teacher_weight, labels, *, kd_ratio, num_tokens, temperature=None)`` → ``(ce, kd)``, the call of
    `LinearKDLoss`, so a recipe's step is the same for both. `setup` gives it the two tokenizers
    (and the softcaps) before the first call."""

    def __init__(self, *, temperature: float = 1.0, chunk_size: int = 64):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise KDTuneError(f"kd_loss.chunk_size: expected a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.vocab_size = self.teacher_vocab_size = None
        self.student_softcap = self.teacher_softcap = None
        self.cross_entropy = LinearCrossEntropyLoss(form="chunked")

    def setup(self, student_tokenizer, teacher_tokenizer, *, student_softcap=None, teacher_softcap=None) -> None:
        self.set_vocabularies(student_tokenizer.vocab_size, teacher_tokenizer.vocab_size,
                              student_softcap=student_softcap, teacher_softcap=teacher_softcap)

    def set_vocabularies(self, vocab_size: int, teacher_vocab_size: int, *, student_softcap=None,
                         teacher_softcap=None) -> None:
        """Each model's scored vocabulary (its tokenizer's; rows past it are padding) and logit cap."""
        self.vocab_size, self.teacher_vocab_size = vocab_size, teacher_vocab_size
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap
        self.cross_entropy = LinearCrossEntropyLoss(form="chunked", softcap=student_softcap)

    def span_values(self, log_vs: torch.Tensor, log_vt: torch.Tensor) -> torch.Tensor:
        """``[n]``: each span's distance between the student's and the teacher's log-vectors."""
        raise NotImplementedError

    def topk_span_values(self, log_vs: torch.Tensor, log_vt: torch.Tensor, ids: torch.Tensor,
                         tail: torch.Tensor) -> torch.Tensor:
        """``[n]``: the same against a top-k teacher: its log-vector ``[n, k]`` on ``ids`` and the
        mass ``[n]`` of the rest of its vector; equal to `span_values` when k is the vocabulary."""
        raise NotImplementedError

    def forward(self, student_hidden, student_weight, teacher, teacher_weight, labels, *, kd_ratio: float,
                num_tokens: int, temperature: float | None = None):
        if not isinstance(teacher, AlignedTeacher):
            raise KDTuneError(f"kd_loss: {type(self).__name__} compares two tokenizations; set teacher_tokenizer")
        t = self.temperature if temperature is None else temperature
        ce = self.cross_entropy(student_hidden, student_weight, labels, num_tokens=num_tokens)
        spans = teacher.spans.to(student_hidden.device)
        kd = student_hidden.new_zeros((), dtype=torch.float32)
        if kd_ratio == 0 or len(spans) == 0:
            return ce, kd
        weight_s = student_weight[: self.vocab_size]
        if isinstance(teacher.hidden, TeacherTopK):  # a top-k teacher: its rows are all there is of it
            for begin in range(0, len(spans), self.chunk_size):
                chunk = spans[begin : begin + self.chunk_size]
                kd = kd + checkpoint(self._chunk_topk, student_hidden, weight_s, labels, teacher.hidden.logprobs,
                                     teacher.hidden.ids, teacher.token_logprobs, chunk, t, use_reentrant=False)
            return ce, kd / num_tokens
        weight_t = teacher_weight[: self.teacher_vocab_size]
        teacher_targets = F.pad(teacher.tokens[:, 1:], (0, 1))  # the token after each position
        for begin in range(0, len(spans), self.chunk_size):
            chunk = spans[begin : begin + self.chunk_size]
            kd = kd + checkpoint(self._chunk, student_hidden, weight_s, labels, teacher.hidden, weight_t,
                                 teacher_targets, chunk, t, use_reentrant=False)
        return ce, kd / num_tokens

    def _chunk(self, hidden, weight, labels, teacher_hidden, teacher_weight, teacher_targets, chunk, temperature):
        rows, s0, s1, t0, t1 = chunk.unbind(1)
        log_vs = span_log_vectors(hidden, weight, labels, rows, s0, s1, temperature=temperature, cap=self.student_softcap)
        with torch.no_grad():
            log_vt = span_log_vectors(teacher_hidden, teacher_weight, teacher_targets, rows, t0, t1,
                                      temperature=temperature, cap=self.teacher_softcap)
        return (self.span_values(log_vs, log_vt) * (s1 - s0)).sum()

    def _chunk_topk(self, hidden, weight, labels, logprobs, ids, token_logprobs, chunk, temperature):
        """A chunk against a top-k teacher: its rows are at the temperature already (the served rows
        are tempered when fetched), and its later tokens' log-probabilities at temperature 1."""
        rows, s0, s1, t0, t1 = chunk.unbind(1)
        log_vs = span_log_vectors(hidden, weight, labels, rows, s0, s1, temperature=temperature, cap=self.student_softcap)
        span, position = later_tokens(t0, t1)
        dtype = log_vs.dtype
        later = torch.zeros(len(rows), dtype=dtype, device=rows.device).index_add(
            0, span, token_logprobs[rows[span], position].to(dtype))
        first = logprobs[rows, t0 - 1].to(dtype)
        log_vt = first + later[:, None]
        tail = (-torch.expm1(first.logsumexp(-1))).clamp_min(0) * later.exp()
        return (self.topk_span_values(log_vs, log_vt, ids[rows, t0 - 1], tail) * (s1 - s0)).sum()


class ULDLoss(CrossTokenizerLoss):
    """Universal Logit Distillation: the L1 distance between the sorted span vectors (module docstring)."""

    def span_values(self, log_vs, log_vt):
        return sorted_l1(log_vs.exp(), log_vt.exp())

    def topk_span_values(self, log_vs, log_vt, ids, tail):
        return sorted_l1(log_vs.exp(), log_vt.exp(), tail)


class HybridULDLoss(CrossTokenizerLoss):
    """GOLD-style hybrid: the generalized KL on the tokens both vocabularies spell the same, ULD on
    the rest, weighted ``matched_weight`` and ``1 - matched_weight`` (default: the matched share of
    the teacher's vocabulary)."""

    def __init__(self, *, matched_weight: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.matched_weight = None if matched_weight is None else _check_weight("matched_weight", matched_weight)
        self.register_buffer("student_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("teacher_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    def setup(self, student_tokenizer, teacher_tokenizer, **caps) -> None:
        from kdtune.tokenization.vocab_map import matched_tokens

        super().setup(student_tokenizer, teacher_tokenizer, **caps)
        self.set_matches(*matched_tokens(student_tokenizer, teacher_tokenizer))

    def set_matches(self, student_ids: list[int], teacher_ids: list[int]) -> None:
        """The matched tokens: ``student_ids[i]`` is spelled as ``teacher_ids[i]`` (each id once)."""
        self.student_ids, self.teacher_ids = torch.tensor(student_ids, dtype=torch.long), torch.tensor(teacher_ids, dtype=torch.long)
        self.student_rest = torch.ones(self.vocab_size, dtype=torch.bool).index_fill(0, self.student_ids, False)
        self.teacher_rest = torch.ones(self.teacher_vocab_size, dtype=torch.bool).index_fill(0, self.teacher_ids, False)
        self.weight_of_matched = self.matched_weight if self.matched_weight is not None else \
            len(teacher_ids) / self.teacher_vocab_size
        # each teacher id's matched student id, or -1 (the top-k path looks its k ids up)
        self.to_student = torch.full((self.teacher_vocab_size,), -1, dtype=torch.long)
        self.to_student[self.teacher_ids] = self.student_ids

    def topk_span_values(self, log_vs, log_vt, ids, tail):
        """The matched part over the matched ids among the teacher's k; everything else (the
        student's other entries, the teacher's unmatched k and its tail) to ULD with the tail bucket."""
        mapped = self.to_student.to(ids.device)[ids]  # [n, k]: the student's id of each of the teacher's, or -1
        matched = mapped >= 0
        log_q = log_vs.gather(-1, mapped.clamp_min(0))
        p, q = log_vt.exp(), log_q.exp()
        kl = torch.where(matched, p * (log_vt - log_q) - p + q, 0).sum(-1)
        taken = torch.zeros_like(log_vs, dtype=torch.long).scatter_add(-1, mapped.clamp_min(0), matched.long()) > 0
        rest_s = torch.where(taken, 0.0, log_vs.exp())  # the student's entries not matched in the teacher's k
        rest_t = torch.where(matched, 0.0, p)
        rest = sorted_l1(rest_s, rest_t, tail)
        return self.weight_of_matched * kl + (1 - self.weight_of_matched) * rest

    def span_values(self, log_vs, log_vt):
        device = log_vs.device
        log_q, log_p = log_vs[:, self.student_ids.to(device)], log_vt[:, self.teacher_ids.to(device)]
        p, q = log_p.exp(), log_q.exp()
        matched = (p * (log_p - log_q) - p + q).sum(-1)
        rest = sorted_l1(log_vs[:, self.student_rest.to(device)].exp(), log_vt[:, self.teacher_rest.to(device)].exp())
        return self.weight_of_matched * matched + (1 - self.weight_of_matched) * rest
