"""The fused loss's closed-form block math (cross-entropy, forward KL and their logit gradient) as
one function, and its compiled form.

Eager PyTorch runs this math as about seven kernels per ``[rows, V]`` block (softmaxes, log-softmaxes,
a difference, a dot product, the gradient), each exp-heavy pass on its own; ``torch.compile``
(inductor: C++/OpenMP loops on the CPU, Triton kernels on a GPU) fuses it into one kernel: per
model a max pass and an exp-sum pass, then one pass that recomputes both exps and writes the
gradient, with nothing ``[rows, V]`` stored in float32 between them. Inductor keeps what it builds on disk
(``TORCHINDUCTOR_CACHE_DIR``, by default under the temporary folder), so a process's first call
pays the trace and only a machine's first ever call the C++ build.
"""

import warnings

import torch

from kdtune.modules.softcap import softcap

# Rows of float32 [rows, V] per compiled call (about 8 MB, from L3): fewer calls than the eager
# path's blocks, which must fit L2 because each of their kernels passes over the block again.
COMPILED_BLOCK_BYTES = 8 << 20

_compiled = None  # the compiled function; False once compiling has failed in this process


def compiled_rows(vocab: int) -> int:
    return max(1, COMPILED_BLOCK_BYTES // (4 * vocab))


def block_math(logits, teacher, targets, ratio, temperature: float, student_cap: float | None,
               teacher_cap: float | None, out):
    """``(ce, kd)`` of a block of rows, summed cross-entropy (temperature 1) and summed forward KL at
    ``temperature`` (``teacher`` None: 0), with the gradient of ``(1 - ratio) * ce + ratio * kd``
    with respect to the raw student logits written to ``out`` (which may be ``logits`` itself).
    Float32 math. ``ratio`` is a 0-d float32 tensor, so a new value reuses the compiled code.

    Written in log-sum-exps, with each probability an ``exp`` of a log-probability where it is used:
    the compiler then recomputes exps in the last pass instead of storing float32 ``[rows, V]``
    softmaxes and reading them back (one store and load per logit cost more than an exp here)."""
    s = softcap(logits.float(), student_cap)
    log_q = s - s.logsumexp(-1, keepdim=True)
    ce = -log_q.gather(-1, targets[:, None]).sum()
    onehot = torch.arange(s.shape[-1], device=s.device)[None, :] == targets[:, None]
    if teacher is None:
        grad, kd = log_q.exp() - onehot.float(), torch.zeros((), dtype=torch.float32, device=s.device)
    else:
        t = softcap(teacher.float(), teacher_cap)
        s_t, t_t = (s, t) if temperature == 1 else (s / temperature, t / temperature)
        log_q_t = log_q if temperature == 1 else s_t - s_t.logsumexp(-1, keepdim=True)
        log_p = t_t - t_t.logsumexp(-1, keepdim=True)
        p = log_p.exp()
        # p (log p - log q); entries with p = 0 (teacher logit -inf) count 0
        kd = torch.where(p > 0, p * (log_p - log_q_t), 0.0).sum()
        # (1 - r)(q - onehot) + (r / T)(q_T - p); at T = 1, q - r p - (1 - r) onehot
        if temperature == 1:
            grad = log_q.exp() - ratio * p - torch.where(onehot, 1 - ratio, 0.0)
        else:
            grad = (1 - ratio) * (log_q.exp() - onehot.float()) + (ratio / temperature) * (log_q_t.exp() - p)
    if student_cap is not None:  # chained through the cap: d cap·tanh(x/cap)/dx = 1 - (capped/cap)^2
        grad = grad * (1 - (s / student_cap) ** 2)
    out.copy_(grad)
    return ce, kd


def compiled_block_math(logits, teacher, targets, ratio, temperature, student_cap, teacher_cap, out):
    """`block_math` through ``torch.compile``; None when compiling fails (said once per process, as
    one warning), and the caller then runs the eager math."""
    global _compiled
    if _compiled is False:
        return None
    if _compiled is None:
        _compiled = torch.compile(block_math)
    try:
        # the rows vary (a chunk's last block), the vocabulary does not: one build per vocabulary, with
        # its trip counts known to the compiler (all-dynamic shapes ran slower here)
        for tensor in (logits, teacher, targets, out):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return _compiled(logits, teacher, targets, ratio, temperature, student_cap, teacher_cap, out)
    except Exception as error:  # noqa: BLE001 - whatever fails in the compiler stack, eager still works
        _compiled = False
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"loss compile: torch.compile of the fused loss failed, running it eagerly "
                      f"({type(error).__name__}: {reason[:200]}); compile_loss: false skips the attempt", stacklevel=2)
        return None
