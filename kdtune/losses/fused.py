"""Cross-entropy and a divergence, fused with both models' output projections.

At a 150k vocabulary the ``[N, V]`` logits are the largest tensors of a distillation step. Here
the logits of one chunk of tokens exist at a time: one GEMM per model makes them, the loss and its
logit gradient are computed a few rows at a time while those rows are in cache (in closed form for
cross-entropy and forward KL, through the divergence's own ``per_token`` and autograd otherwise),
the gradient is folded into those of the student's hidden states and output weight, and the chunk
is dropped. Backward then only scales the stored gradients.
"""

import math
import warnings

import torch
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.losses.divergences import Divergence
from kdtune.losses.fused_block import compiled_block_math, compiled_rows
from kdtune.losses.sparse import TeacherTopK
from kdtune.losses.token_loss import upcast
from kdtune.modules.softcap import softcap, softcap_

# Tokens per chunk: two [chunk, V] logit tensors at a time (78 MB each in bf16 at V = 152k); larger
# chunks run the head GEMMs only a few percent faster here.
DEFAULT_CHUNK_SIZE = 256
VOCAB_SLICE = 8192  # output-weight rows per low-precision gradient GEMM summed into float32


class FusedLinearKDLoss(nn.Module):
    """Cross-entropy and ``divergence`` from hidden states and output weights, a chunk at a time.

    ``forward(student_hidden [N, d_s], student_weight [V, d_s], teacher_hidden [N, d_t],
    teacher_weight [V, d_t], labels [N], *, kd_ratio, num_valid_tokens=None, temperature=None)``
    → ``(ce, kd)``, both differentiable (leading dims of hidden/labels are flattened). The teacher
    may be a :class:`TeacherTopK` (then ``teacher_weight`` is None), or None for cross-entropy
    alone (``kd`` is then 0). Teacher inputs are constants; the student weight gets a gradient when
    it requires one. Without a ``divergence`` this is cross-entropy alone.

    The pass computes the gradient of ``(1 - kd_ratio) * ce + kd_ratio * kd`` as it goes, so the
    loss you backpropagate must weigh ``ce`` and ``kd`` in that proportion: that sum, any multiple of
    it, plus terms of your own. Another mix is an error in backward, never a wrong gradient; the
    ``chunked`` and ``full`` forms (:class:`~kdtune.losses.LinearKDLoss`) take any mix.

    ``student_softcap`` / ``teacher_softcap``: each model's final-logit cap (Gemma 2's
    ``final_logit_softcapping``, None for none), applied as ``cap * tanh(logits / cap)`` to its logits
    before the temperature and the divergence, with the student's gradient through it; a cached
    teacher's rows were capped when the cache was made.

    ``ignore_index``, ``temperature`` (unless given per call), ``vocab_size`` and ``reduction``
    come from ``divergence`` (CE uses temperature 1). The normalizer is ``num_valid_tokens`` when
    given — pass the valid-token count of the whole optimizer step (all micro-batches, all ranks)
    so that accumulated gradients are exact — else the local count (``mean``) or 1 (``sum``).
    Peak memory grows with ``chunk_size × V``: the chunk's student and teacher logits in the weights'
    dtype (the gradient overwrites the student's), plus float32 blocks of `block_rows` rows, and the
    output weight's gradient, a float32 ``[V, d]`` sum; where every token's ``[N, V]`` logit gradient
    takes no more memory than that sum and one chunk of logits, those are kept instead and the weight
    gradient is one GEMM over all tokens in backward (a bf16 student of width d: N up to 2d + chunk).

    ``compile``: run the closed-form block math (cross-entropy alone, or with forward KL from a
    dense teacher) through ``torch.compile`` (`kdtune.losses.fused_block`); where compiling fails
    the eager math runs, after one warning.
    """

    def __init__(self, divergence: Divergence | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                 student_softcap: float | None = None, teacher_softcap: float | None = None,
                 compile: bool = False):
        super().__init__()
        self.compile = bool(compile)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise KDTuneError(f"loss chunk_size: expected a positive integer, got {chunk_size!r}")
        self.student_softcap, self.teacher_softcap = check_softcap(student_softcap), check_softcap(teacher_softcap)
        self.divergence = divergence
        self.ignore_index = divergence.ignore_index if divergence is not None else -100
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, kd_ratio: float,
                num_valid_tokens: int | None = None, temperature: float | None = None):
        kd_ratio = check_kd_ratio(kd_ratio)
        labels = labels.reshape(-1)
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        keep = (labels != self.ignore_index).nonzero().squeeze(1)
        if teacher_hidden is not None and self.divergence is None:
            raise ValueError("FusedLinearKDLoss: a teacher was given to a loss without a divergence")
        if teacher_hidden is None and kd_ratio > 0:
            raise ValueError("FusedLinearKDLoss: a teacher is required when kd_ratio > 0")
        dense = teacher_hidden is not None and not isinstance(teacher_hidden, TeacherTopK)
        vocab = self._vocab(student_weight.shape[0], teacher_weight.shape[0] if dense else None)
        teacher = None
        if isinstance(teacher_hidden, TeacherTopK):
            self.check_cache_temperature(temperature)
            teacher = teacher_hidden.flat().rows(keep)
        elif dense:
            rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep)
            teacher = (rows, teacher_weight.detach()[:vocab])
        settings = (kd_ratio, temperature, self._normalizer(keep.numel(), num_valid_tokens), torch.is_grad_enabled())
        # A slice only when rows are cut: autograd's backward of a slice allocates a second [V, d] gradient.
        weight = student_weight if vocab == student_weight.shape[0] else student_weight[:vocab]
        return _FusedKD.apply(hidden, weight, keep, labels[keep], teacher, self, settings)

    def check_cache_temperature(self, temperature: float | None) -> None:
        """A cached teacher's log-probabilities hold the temperature they were made at (the
        divergence's, checked when the cache was opened); a per-call temperature cannot change it."""
        if temperature is not None and temperature != self.divergence.temperature:
            raise KDTuneError(f"kd_loss temperature: {temperature} differs from {self.divergence.temperature}, the "
                              f"temperature of the teacher cache; a cache holds one temperature")

    def _vocab(self, student_width: int, teacher_width: int | None) -> int:
        if self.divergence is None:
            return student_width
        return self.divergence.common_vocab(student_width, teacher_width)

    def _normalizer(self, count: int, num_valid_tokens: int | None) -> float:
        if num_valid_tokens is not None:
            if num_valid_tokens <= 0:
                raise ValueError(f"num_valid_tokens must be positive, got {num_valid_tokens}")
            return float(num_valid_tokens)
        if self.divergence is not None and self.divergence.reduction == "sum":
            return 1.0
        if count == 0:
            warnings.warn("loss: no token has a valid label in this batch; the loss is 0", stacklevel=3)
            return 1.0
        return float(count)

    def compiles(self, teacher) -> bool:
        """Whether blocks with this teacher run the compiled math: its closed form covers
        cross-entropy alone and forward KL (`sum_and_probs`) from dense logits."""
        if not self.compile:
            return False
        return teacher is None or (not isinstance(teacher, TeacherTopK)
                                   and getattr(self.divergence, "sum_and_probs", None) is not None)

    def block_sums(self, logits: torch.Tensor, teacher, targets: torch.Tensor, temperature: float | None = None):
        """Summed CE and divergence of a block of valid tokens, from the student's logits and the
        teacher's (logits, a :class:`TeacherTopK`, or None), in float32; the student's log-softmax is
        computed once for both. Each model's logits are capped here when it caps them."""
        logits = softcap(upcast(logits), self.student_softcap)
        log_q = logits.log_softmax(-1)
        ce = -log_q.gather(-1, targets[:, None]).sum()
        if teacher is None:
            return ce, torch.zeros_like(ce)
        if not isinstance(teacher, TeacherTopK):
            teacher = softcap(upcast(teacher), self.teacher_softcap)
        return ce, self.divergence.token_values(logits, teacher, temperature=temperature, student_log_probs=log_q).sum()

    def block_sums_and_grad(self, logits: torch.Tensor, teacher, targets: torch.Tensor, temperature,
                            ratio: float, out: torch.Tensor):
        """What `block_sums` gives, with the gradient of ``(1 - ratio) * ce + ratio * kd`` with respect
        to the logits written to ``out`` (in its dtype): in closed form for a dense teacher (or none)
        and a divergence that has one (``sum_and_probs``), compiled where `compiles`, by autograd
        otherwise."""
        if self.compiles(teacher):
            t = 1.0 if self.divergence is None else self.divergence.temperature if temperature is None else temperature
            ratio_t = torch.tensor(ratio, dtype=torch.float32, device=logits.device)
            # the fused pass overwrites each block's logits with their gradient: the same tensor then,
            # so that the compiled code writes in place rather than into a second view of one buffer
            target = logits if _same_memory(out, logits) else out
            result = compiled_block_math(logits, teacher, targets, ratio_t, float(t), self.student_softcap,
                                         self.teacher_softcap, target)
            if result is not None:
                return result
        closed = getattr(self.divergence, "sum_and_probs", None)
        if isinstance(teacher, TeacherTopK) or (teacher is not None and closed is None):
            with torch.enable_grad():
                logits = upcast(logits).detach().requires_grad_()
                ce, kd = self.block_sums(logits, teacher, targets, temperature)
                (grad,) = torch.autograd.grad((1 - ratio) * ce + ratio * kd, logits)
            out.copy_(grad)
            return ce.detach(), kd.detach()
        dtype = torch.promote_types(logits.dtype, torch.float32)
        cap = self.student_softcap
        if cap is not None:
            # Capped in place: the block's logits are read only here, and its gradient overwrites them
            # (a low-precision block is first copied to float32). The gradient below is with respect
            # to the capped logits; it is chained through the cap at the end.
            logits = softcap_(logits.to(dtype), cap)
        if teacher is not None and self.teacher_softcap is not None:
            teacher = softcap_(upcast(teacher), self.teacher_softcap)
        # softmax, not log_q.exp(): see `probabilities` (log-probabilities below -87 are common)
        log_q, q = logits.log_softmax(-1, dtype=dtype), logits.softmax(-1, dtype=dtype)
        ce = -log_q.gather(-1, targets[:, None]).sum()
        if teacher is None:  # cross-entropy alone (kd_ratio is 0): q - onehot
            q.scatter_add_(-1, targets[:, None], q.new_full((len(targets), 1), -1.0))
            _write_grad(q, logits, cap, out)
            return ce, torch.zeros_like(ce)
        kd, q_t, p_t = closed(logits, teacher, temperature=temperature, student_log_probs=log_q, student_probs=q)
        # (1 - r)(q - onehot) + (r / T)(q_T - p_T); at T = 1 q_T is q, and this is q - r p - (1 - r) onehot
        t = self.divergence.temperature if temperature is None else temperature
        if t != 1:
            q.mul_(1 - ratio).add_(q_t, alpha=ratio / t)
        q.scatter_add_(-1, targets[:, None], q.new_full((len(targets), 1), -(1 - ratio)))
        if cap is None:
            torch.sub(q, p_t, alpha=ratio / t, out=out)
        else:
            _write_grad(q.sub_(p_t, alpha=ratio / t), logits, cap, out)
        return ce, kd


def block_rows(vocab: int) -> int:
    """Rows of float32 ``[rows, V]`` logits the loss works on at a time: about 2.5 MB, so that the
    element-wise passes of the loss and its gradient run in cache rather than from memory
    (on a 2-core EPYC with 2 MB of L2 per core, 7x faster at V = 152k than whole 256-row chunks)."""
    return max(1, (5 << 19) // (4 * vocab))


def _write_grad(grad: torch.Tensor, capped: torch.Tensor, cap: float | None, out: torch.Tensor) -> None:
    """``out`` = the gradient with respect to the raw logits, from ``grad`` with respect to the
    ``capped`` ones: times ``1 - (capped / cap)^2``, the cap's derivative (both float32 temporaries
    of the block are reused)."""
    if cap is not None:  # 1 - capped^2 / cap^2 in one pass, into the capped logits' buffer
        grad.mul_(torch.addcmul(capped.new_ones(()), capped, capped, value=-1 / cap**2, out=capped))
    out.copy_(grad)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def check_softcap(cap) -> float | None:
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise KDTuneError(f"loss softcap: expected a positive number or null, got {cap!r}")
    return float(cap)


def check_kd_ratio(kd_ratio) -> float:
    if isinstance(kd_ratio, bool) or not isinstance(kd_ratio, (int, float)) or not 0 <= kd_ratio <= 1:
        raise KDTuneError(f"kd_ratio: expected a number in [0, 1], got {kd_ratio!r}")
    return float(kd_ratio)


class _FusedKD(torch.autograd.Function):
    """CE and KD with the student gradients of their mix in one chunked pass; nothing ``[N, V]`` is
    kept for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, keep, targets, teacher, loss: FusedLinearKDLoss, settings):
        ratio, temperature, normalizer, grad_enabled = settings
        rows = hidden.index_select(0, keep)
        grad_rows = torch.zeros_like(rows) if grad_enabled and ctx.needs_input_grad[0] else None
        weight_grad = grad_enabled and ctx.needs_input_grad[1]
        # The output weight's gradient, sum over tokens of (logit gradient)^T (hidden row), is made one of
        # two ways: each chunk's product added into a float32 [V, d] sum, or, where it takes no more
        # memory than that sum and a chunk's logits, every chunk's logit gradient kept ([N, V], in the
        # weight's dtype) for one GEMM over all tokens in backward (no float32 [V, d] traffic per
        # chunk, and one rounding of the sum instead of one per chunk's product).
        keep_all = weight_grad and _keeps_logit_grads(rows, weight, loss.chunk_size)
        all_logits = torch.empty(rows.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device) \
            if keep_all else None
        # written by the first chunk's product, so not zeroed first (an empty batch zeroes it below)
        grad_weight = torch.empty(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device) if weight_grad and not keep_all else None
        ce_total = kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        wanted = grad_rows is not None or weight_grad
        compiled = wanted and loss.compiles(teacher)
        step = compiled_rows(weight.shape[0]) if compiled else block_rows(weight.shape[0])
        logits = teacher_logits = None  # after the first chunk, each chunk's logits overwrite the last one's
        for start in range(0, rows.shape[0], loss.chunk_size):
            part = slice(start, start + loss.chunk_size)
            # the chunk's head GEMM, in the weights' dtype (autocast's, where it is on)
            logits = _head(rows[part], weight, all_logits[part] if keep_all else logits)
            teacher_logits = _teacher_chunk(teacher, part, teacher_logits)
            grad_logits = logits if wanted else None  # each block's gradient overwrites its logits, once read
            for first in range(0, logits.shape[0], step):
                block = slice(first, first + step)
                block_teacher = _teacher_block(teacher_logits, block)
                if wanted:
                    ce, kd = loss.block_sums_and_grad(logits[block], block_teacher, targets[part][block], temperature,
                                                      ratio, out=grad_logits[block])
                else:
                    ce, kd = loss.block_sums(logits[block], block_teacher, targets[part][block], temperature)
                ce_total, kd_total = ce_total + ce, kd_total + kd
            if grad_rows is not None:
                grad_rows[part] = grad_logits @ weight
            if grad_weight is not None:
                _add_weight_grad(grad_weight, grad_logits, rows[part], first=start == 0)
            del grad_logits, block_teacher
        del logits, teacher_logits
        if grad_weight is not None and rows.shape[0] == 0:
            grad_weight.zero_()
        if grad_rows is not None:
            ctx.grad_hidden = torch.zeros_like(hidden).index_copy_(0, keep, grad_rows)
        # The gradients above are of the unnormalized sum; backward divides by the normalizer.
        ctx.grad_weight, ctx.weight_dtype, ctx.ratio, ctx.normalizer = grad_weight, weight.dtype, ratio, normalizer
        ctx.logit_grads, ctx.rows = (all_logits, rows) if keep_all else (None, None)
        return ce_total / normalizer, kd_total / normalizer

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        scale = _mix_scale(float(grad_ce), float(grad_kd), ctx.ratio) / ctx.normalizer
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ctx.grad_hidden * scale
        if ctx.needs_input_grad[1] and ctx.logit_grads is not None:
            # one GEMM over every token, scaled inside it (beta 0: the output's initial values are ignored)
            grads, rows = ctx.logit_grads, ctx.rows
            out = torch.empty((grads.shape[1], rows.shape[1]), dtype=grads.dtype, device=grads.device)
            grad_weight = torch.addmm(out, grads.T, rows, beta=0, alpha=scale)
        elif ctx.needs_input_grad[1]:
            grad_weight = ctx.grad_weight.to(ctx.weight_dtype)  # a copy unless the dtypes match
            # scaled in place when that is a copy (one multiply from float32 into a bf16 output ran slower
            # than the copy and the scale); never the saved gradient itself, which a second backward reuses
            grad_weight = grad_weight * scale if grad_weight is ctx.grad_weight else grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None, None


def _keeps_logit_grads(rows: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> bool:
    """Whether the fused pass keeps every chunk's logit gradient for one weight-gradient GEMM: where
    the logits are in the weight's dtype (no autocast to another), the hidden rows too, and ``[N, V]``
    of them take no more memory than what they replace, the ``[V, d]`` sum (float32 or wider) and one chunk's
    ``[chunk, V]`` logits (N up to 2d + chunk tokens in bf16, d + chunk in float32 and float64)."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != weight.dtype:
        return False
    if rows.dtype != weight.dtype:
        return False
    size, sum_size = weight.element_size(), torch.promote_types(weight.dtype, torch.float32).itemsize
    return rows.shape[0] * size <= weight.shape[1] * sum_size + min(chunk_size, rows.shape[0]) * size


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, rows: torch.Tensor, first: bool) -> None:
    """``grad_weight`` (+)= ``grad_logits^T @ rows``: written by the first chunk, added by the rest."""
    if grad_logits.dtype == grad_weight.dtype == rows.dtype:
        if first:
            torch.mm(grad_logits.T, rows, out=grad_weight)
        else:
            grad_weight.addmm_(grad_logits.T, rows)
        return
    # Low-precision GEMMs (bf16 weights or autocast) summed in float32, a slice of the vocabulary at a
    # time: no [V, d] temporary, and each product is added while it is in cache.
    for start in range(0, grad_weight.shape[0], VOCAB_SLICE):
        vocab = slice(start, start + VOCAB_SLICE)
        product = grad_logits[:, vocab].T @ rows
        if first:
            grad_weight[vocab].copy_(product)
        else:
            grad_weight[vocab].add_(product)


def _mix_scale(grad_ce: float, grad_kd: float, ratio: float) -> float:
    """``s`` with ``(grad_ce, grad_kd) = s · (1 - ratio, ratio)``: how much of the mix the forward
    pass differentiated reached the loss; a loss that weighs ce and kd otherwise is refused."""
    scale = grad_ce + grad_kd
    tolerance = 1e-5 * abs(scale) + 1e-30
    if not (math.isclose(grad_ce, scale * (1 - ratio), abs_tol=tolerance)
            and math.isclose(grad_kd, scale * ratio, abs_tol=tolerance)):
        raise KDTuneError(
            f"kd_loss: the fused loss was called with kd_ratio={ratio:g}, so the loss backpropagated must weigh "
            f"ce and kd as (1 - kd_ratio) * ce + kd_ratio * kd (or a multiple of it), but it weighs them "
            f"{grad_ce:g} and {grad_kd:g}; pass the kd_ratio you mix with, or use loss_form=chunked for other mixes")
    return scale


def _head(rows: torch.Tensor, weight: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """``rows @ weight.T``, written into ``last`` when given: the previous chunk's logits (a fresh
    ``[chunk, V]`` tensor each chunk pays its page faults again; with a new output each call,
    ``bench_kd_step``'s bf16 GEMM rate at the small heads was a third lower) or the chunk's rows of
    the kept ``[N, V]`` logits. Otherwise the product sets the dtype (autocast's, where it is on)."""
    if last is None:
        return rows @ weight.T
    out = last[: rows.shape[0]]
    return torch.mm(rows.to(out.dtype), weight.T.to(out.dtype), out=out)


def _teacher_chunk(teacher, part: slice, last: torch.Tensor | None):
    """The teacher of a chunk of rows: its logits (the teacher's head GEMM, in its weights' dtype,
    over ``last``, the previous chunk's), its top-k rows, or None."""
    if teacher is None or isinstance(teacher, TeacherTopK):
        return teacher if teacher is None else teacher.rows(part)
    rows, weight = teacher
    return _head(rows[part], weight, last)


def _teacher_block(teacher, block: slice):
    if teacher is None or isinstance(teacher, TeacherTopK):
        return teacher if teacher is None else teacher.rows(block)
    return teacher[block]
