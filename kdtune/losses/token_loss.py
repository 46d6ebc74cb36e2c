"""The full and chunked forms shared by every loss, and the token-count normalization.

A loss only defines its per-token values on float32 ``[N, V]`` rows of valid tokens
(``TokenLoss.token_values``); selecting those rows, cutting padded vocabularies, walking the chunks
and reducing happen here once, so every loss supports every form the same way.
"""

import warnings

import torch
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.losses.sparse import TeacherTopK


def count_valid_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Number of labels that are not ``ignore_index``: the normalizer of a ``reduction="sum"`` loss.

    Sum it over the micro-batches of an optimizer step (and all-reduce it over ranks) to get the
    exact per-token mean of the whole step.
    """
    return int((labels != ignore_index).sum())


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision inputs; float64 stays float64 (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalize(total: torch.Tensor, count: int, reduction: str) -> torch.Tensor:
    """Divide a summed loss by the valid-token count for ``mean``; 0 (and a warning) when there is none."""
    if reduction == "sum":
        return total
    if count == 0:
        warnings.warn("loss: no token has a valid label in this batch; the loss is 0", stacklevel=3)
        return total
    return total / count


class TokenLoss(nn.Module):
    """A loss summed over the tokens whose label is not ``ignore_index``.

    ``forward(student_logits, teacher, labels)`` takes either full ``[B, S, V]`` tensors or lists of
    chunks along the sequence dimension (as a model returns them); ``teacher`` may be dense logits,
    a :class:`TeacherTopK`, a list of either, or None for losses that use only the labels. Each
    chunk is differentiated as soon as it is computed, so only its gradient (the size of the chunk,
    in its dtype) outlives it, never its float32 intermediates.

    ``reduction="mean"`` divides by the batch's valid tokens; ``"sum"`` returns the sum, to divide
    by :func:`count_valid_tokens` accumulated over a whole optimizer step. ``vocab_size`` cuts
    both models' logits to the tokenizer's vocabulary (padding rows dropped); without it, when the
    two widths differ, both are cut to the smaller one.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", vocab_size: int | None = None):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise KDTuneError(f"loss reduction: expected 'mean' or 'sum', got {reduction!r}")
        if vocab_size is not None and vocab_size <= 0:
            raise KDTuneError(f"loss vocab_size: expected a positive integer, got {vocab_size!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.vocab_size = vocab_size

    def token_values(self, student_logits: torch.Tensor, teacher, targets: torch.Tensor) -> torch.Tensor:
        """Per-token values ``[N]`` from float32 student logits ``[N, V]`` of valid tokens only."""
        raise NotImplementedError

    def common_vocab(self, student_width: int, teacher_width: int | None) -> int:
        """Vocabulary both models are scored on: ``vocab_size`` if set, else the smaller width."""
        widths = [student_width] + ([teacher_width] if teacher_width is not None else [])
        if self.vocab_size is None:
            return min(widths)
        if self.vocab_size > min(widths):
            raise KDTuneError(f"loss vocab_size={self.vocab_size} exceeds the logits' width {min(widths)}")
        return self.vocab_size

    def forward(self, student_logits, teacher, labels: torch.Tensor, **options) -> torch.Tensor:
        """``options`` go to ``token_values`` (a divergence's per-call ``temperature``)."""
        count = count_valid_tokens(labels, self.ignore_index)
        if not isinstance(student_logits, (list, tuple)):
            return normalize(self._sum(student_logits, teacher, labels, options), count, self.reduction)
        sizes = [chunk.shape[1] for chunk in student_logits]
        teachers = _split(teacher, sizes) if not isinstance(teacher, (list, tuple)) else teacher
        if len(teachers) != len(student_logits):
            raise ValueError(f"{len(student_logits)} student chunks but {len(teachers)} teacher chunks")
        total = sum(
            _EagerChunk.apply(s, t, y, self, options) if s.requires_grad and torch.is_grad_enabled()
            else self._sum(s, t, y, options)
            for s, t, y in zip(student_logits, teachers, labels.split(sizes, dim=1))
        )
        return normalize(total, count, self.reduction)

    def _sum(self, student_logits: torch.Tensor, teacher, labels: torch.Tensor, options: dict) -> torch.Tensor:
        """Sum of per-token values over the valid rows of one chunk (or of the full tensors)."""
        labels = labels.reshape(-1)
        keep = (labels != self.ignore_index).nonzero().squeeze(1)
        dense_teacher = isinstance(teacher, torch.Tensor)
        vocab = self.common_vocab(student_logits.shape[-1], teacher.shape[-1] if dense_teacher else None)
        rows = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab].index_select(0, keep)
        if dense_teacher:
            teacher = teacher.detach().reshape(-1, teacher.shape[-1])[:, :vocab].index_select(0, keep)
        elif isinstance(teacher, TeacherTopK):
            teacher = teacher.flat().rows(keep)
        return self.token_values(upcast(rows), teacher, labels[keep], **options).sum()


class _EagerChunk(torch.autograd.Function):
    """A chunk's summed loss whose gradient is computed in the forward pass and kept for backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, loss: TokenLoss, options: dict):
        with torch.enable_grad():
            leaf = student.detach().requires_grad_()
            total = loss._sum(leaf, teacher, labels, options)
            (ctx.grad,) = torch.autograd.grad(total, leaf)
        return total.detach()

    @staticmethod
    def backward(ctx, grad_total):
        return ctx.grad * grad_total, None, None, None, None


def _split(teacher, sizes: list[int]) -> list:
    """Split a full teacher along the sequence dimension to match the student's chunks."""
    if teacher is None:
        return [None] * len(sizes)
    if isinstance(teacher, TeacherTopK):
        return teacher.split(sizes)
    return list(teacher.split(sizes, dim=1))
