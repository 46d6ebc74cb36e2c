"""Cross-entropy plus a divergence, fused with both models' output projections.

At a 150k vocabulary the ``[N, V]`` logits are the largest tensors of a distillation step. Here
the logits of one chunk of tokens exist at a time: each chunk's loss is computed and differentiated
at once (through the divergence's own ``per_token``), its logit gradient is folded into the
gradients for the student's hidden states and output weight, and the chunk is dropped. Backward
then only scales those stored gradients.
"""

import warnings

import torch
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.losses.cross_entropy import CrossEntropyLoss
from kdtune.losses.divergences import Divergence
from kdtune.losses.sparse import TeacherTopK
from kdtune.losses.token_loss import upcast


class FusedLinearKDLoss(nn.Module):
    """``(1 − kd_ratio)·CE + kd_ratio·divergence`` from hidden states and output weights.

    ``forward(student_hidden [N, d_s], student_weight [V, d_s], teacher_hidden [N, d_t],
    teacher_weight [V, d_t], labels [N], *, num_valid_tokens=None)`` → ``(loss, ce, kd)``, the last
    two detached for logging (leading dims of hidden/labels are flattened). The teacher may be a
    :class:`TeacherTopK` (then ``teacher_weight`` is None), and None when ``kd_ratio`` is 0. Teacher
    inputs are constants; the student weight gets a gradient when it requires one.

    ``ignore_index``, ``temperature``, ``vocab_size`` and ``reduction`` come from ``divergence``
    (CE uses temperature 1). The normalizer is ``num_valid_tokens`` when given — pass the valid-token
    count of the whole optimizer step (all micro-batches, all ranks) so that accumulated gradients
    are exact — else the local count (``mean``) or 1 (``sum``). Peak memory grows with
    ``chunk_size × V``: a few float32 ``[chunk_size, V]`` tensors.
    """

    def __init__(self, divergence: Divergence, kd_ratio: float = 0.5, chunk_size: int = 128):
        super().__init__()
        if not 0 <= kd_ratio <= 1:
            raise KDTuneError(f"loss kd_ratio: expected a value in [0, 1], got {kd_ratio!r}")
        if chunk_size <= 0:
            raise KDTuneError(f"loss chunk_size: expected a positive integer, got {chunk_size!r}")
        self.divergence = divergence
        self.cross_entropy = CrossEntropyLoss(ignore_index=divergence.ignore_index)
        self.kd_ratio = float(kd_ratio)
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                num_valid_tokens: int | None = None):
        labels = labels.reshape(-1)
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        keep = (labels != self.divergence.ignore_index).nonzero().squeeze(1)
        if teacher_hidden is None and self.kd_ratio > 0:
            raise ValueError("FusedLinearKDLoss: a teacher is required when kd_ratio > 0")
        dense = teacher_hidden is not None and not isinstance(teacher_hidden, TeacherTopK)
        vocab = self.divergence.common_vocab(student_weight.shape[0], teacher_weight.shape[0] if dense else None)
        teacher = None
        if isinstance(teacher_hidden, TeacherTopK):
            teacher = teacher_hidden.flat().rows(keep)
        elif dense:
            rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep)
            teacher = (rows, teacher_weight.detach()[:vocab])
        return _FusedKD.apply(hidden, student_weight[:vocab], keep, labels[keep], teacher, self,
                              self._normalizer(keep.numel(), num_valid_tokens))

    def _normalizer(self, count: int, num_valid_tokens: int | None) -> float:
        if num_valid_tokens is not None:
            if num_valid_tokens <= 0:
                raise ValueError(f"num_valid_tokens must be positive, got {num_valid_tokens}")
            return float(num_valid_tokens)
        if self.divergence.reduction == "sum":
            return 1.0
        if count == 0:
            warnings.warn("loss: no token has a valid label in this batch; the loss is 0", stacklevel=3)
            return 1.0
        return float(count)

    def chunk_sums(self, logits: torch.Tensor, teacher, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed CE and divergence of one chunk of valid tokens, from float32 student logits."""
        ce = self.cross_entropy.token_values(logits, None, targets).sum()
        if teacher is None:
            return ce, torch.zeros_like(ce)
        if not isinstance(teacher, TeacherTopK):
            rows, weight = teacher
            with torch.no_grad():
                teacher = upcast(rows @ weight.T)
        return ce, self.divergence.token_values(logits, teacher).sum()


class _FusedKD(torch.autograd.Function):
    """Loss and student gradients in one chunked pass; nothing ``[N, V]`` is kept for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, keep, targets, teacher, loss: FusedLinearKDLoss, normalizer: float):
        rows = hidden.index_select(0, keep)
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=upcast(weight).dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        ce_total = kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ratio = loss.kd_ratio
        for start in range(0, rows.shape[0], loss.chunk_size):
            part = slice(start, start + loss.chunk_size)
            chunk_teacher = _teacher_chunk(teacher, part)
            with torch.enable_grad():
                logits = upcast(rows[part] @ weight.T).requires_grad_()
                ce, kd = loss.chunk_sums(logits, chunk_teacher, targets[part])
                (grad_logits,) = torch.autograd.grad(((1 - ratio) * ce + ratio * kd) / normalizer, logits)
            ce_total, kd_total = ce_total + ce.detach(), kd_total + kd.detach()
            if grad_rows is not None:
                torch.mm(grad_logits.to(weight.dtype), weight, out=grad_rows[part])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, rows[part].to(grad_weight.dtype))
        ce_total, kd_total = ce_total / normalizer, kd_total / normalizer
        if grad_rows is not None:
            ctx.grad_hidden = torch.zeros_like(hidden).index_copy_(0, keep, grad_rows)
        ctx.grad_weight, ctx.weight_dtype = grad_weight, weight.dtype
        ctx.mark_non_differentiable(ce_total, kd_total)
        return (1 - ratio) * ce_total + ratio * kd_total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ctx.grad_hidden * grad_loss
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.grad_weight.to(ctx.weight_dtype).mul_(grad_loss)  # no float32 temporary
        return grad_hidden, grad_weight, None, None, None, None, None


def _teacher_chunk(teacher, part: slice):
    if teacher is None:
        return None
    if isinstance(teacher, TeacherTopK):
        return teacher.rows(part)
    rows, weight = teacher
    return rows[part], weight
