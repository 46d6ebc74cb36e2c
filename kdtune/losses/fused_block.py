"""The fused loss's closed-form block math (cross-entropy, forward KL and their logit gradient) as
one function, and its compiled form.

Eager PyTorch runs this math as about seven kernels per ``[rows, V]`` block (softmaxes, log-softmaxes,
a difference, a dot product, the gradient), each exp-heavy pass on its own; ``torch.compile``
(inductor: C++/OpenMP loops on the CPU, Triton kernels on a GPU) fuses it into one exp per logit
and a few passes over rows that stay in cache. Inductor keeps what it builds on disk
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


def _softmax_parts(x: torch.Tensor):
    """``(probabilities, log-sum-exp)`` of each row, one exp per entry."""
    top = x.amax(-1, keepdim=True)
    e = (x - top).exp()
    total = e.sum(-1, keepdim=True)
    return e / total, top + total.log()


def block_math(logits, teacher, targets, ratio, temperature: float, student_cap: float | None,
               teacher_cap: float | None):
    """``(ce, kd, grad)`` of a block of rows: summed cross-entropy (temperature 1), summed forward
    KL at ``temperature`` (``teacher`` None: 0), and the gradient of ``(1 - ratio) * ce + ratio * kd``
    with respect to the raw student logits, in ``logits``' dtype. Float32 math. ``ratio`` is a 0-d
    float32 tensor, so a new value reuses the compiled code."""
    s = softcap(logits.float(), student_cap)
    q, lse = _softmax_parts(s)
    ce = (lse.squeeze(-1) - s.gather(-1, targets[:, None]).squeeze(-1)).sum()
    onehot = (torch.arange(s.shape[-1], device=s.device)[None, :] == targets[:, None]).float()
    if teacher is None:
        grad, kd = q - onehot, torch.zeros((), dtype=torch.float32, device=s.device)
    else:
        t = softcap(teacher.float(), teacher_cap)
        s_t, t_t = (s, t) if temperature == 1 else (s / temperature, t / temperature)
        q_t, lse_t = (q, lse) if temperature == 1 else _softmax_parts(s_t)
        p, lse_p = _softmax_parts(t_t)
        # p (log p - log q) from the logits; entries with p = 0 (teacher logit -inf) count 0
        kd = torch.where(p > 0, p * ((t_t - lse_p) - (s_t - lse_t)), 0.0).sum()
        grad = (1 - ratio) * (q - onehot) + (ratio / temperature) * (q_t - p)
    if student_cap is not None:  # chained through the cap: d cap·tanh(x/cap)/dx = 1 - (capped/cap)^2
        grad = grad * (1 - (s / student_cap) ** 2)
    return ce, kd, grad.to(logits.dtype)


def compiled_block_math(logits, teacher, targets, ratio, temperature, student_cap, teacher_cap):
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
        for tensor in (logits, teacher, targets):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return _compiled(logits, teacher, targets, ratio, temperature, student_cap, teacher_cap)
    except Exception as error:  # noqa: BLE001 - whatever fails in the compiler stack, eager still works
        _compiled = False
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"loss compile: torch.compile of the fused loss failed, running it eagerly "
                      f"({type(error).__name__}: {reason[:200]}); compile_loss: false skips the attempt", stacklevel=2)
        return None
