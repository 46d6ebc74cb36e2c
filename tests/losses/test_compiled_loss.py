"""The compiled block math of the fused loss (`kdtune.losses.fused_block`) against the eager fused
loss and a float64 reference from full logits, values and both gradients; its fallback when
compiling fails; and when it runs at all."""

import warnings

import pytest
import torch

from kdtune.losses import fused_block
from kdtune.losses.divergences import ForwardKLLoss
from kdtune.losses.fused import FusedLinearKDLoss

V = 4099  # a vocabulary that no block size divides
N = 70  # valid and ignored tokens, over two chunks of 64


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles anew (dynamo's per-function recompile limit is shared by the whole process)."""
    torch._dynamo.reset()
    fused_block._compiled = None
    yield
    torch._dynamo.reset()
    fused_block._compiled = None


def inputs(dtype, seed=0):
    """Hidden states and weights drawn in float64 and rounded to ``dtype``; a sharp teacher (log-
    probabilities far below -87, where exp turns subnormal) and labels with ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    hidden, weight = torch.randn(N, 16, **f64), torch.randn(V, 16, **f64) * 2
    teacher_hidden, teacher_weight = torch.randn(N, 24, **f64), torch.randn(V, 24, **f64) * 6
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return [t.to(dtype) for t in (hidden, weight, teacher_hidden, teacher_weight)] + [labels]


def reference(hidden, weight, teacher_hidden, teacher_weight, labels, ratio, temperature, caps):
    """The mix and its gradients from whole float64 logits, by autograd (the inputs upcast as given)."""
    hidden, weight = (t.double().detach().requires_grad_() for t in (hidden, weight))
    keep = labels != -100
    logits = hidden[keep] @ weight.T
    teacher = teacher_hidden[keep].double() @ teacher_weight.double().T if teacher_hidden is not None else None
    if caps[0]:
        logits = caps[0] * torch.tanh(logits / caps[0])
    ce = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum")
    kd = torch.zeros((), dtype=torch.float64)
    if teacher is not None:
        if caps[1]:
            teacher = caps[1] * torch.tanh(teacher / caps[1])
        log_p = (teacher / temperature).log_softmax(-1)
        kd = (log_p.exp() * (log_p - (logits / temperature).log_softmax(-1))).sum()
    count = int(keep.sum())
    loss = ((1 - ratio) * ce + ratio * kd) / count
    loss.backward()
    return ce.detach() / count, kd.detach() / count, hidden.grad, weight.grad


def fused(compile, hidden, weight, teacher_hidden, teacher_weight, labels, ratio, temperature, caps):
    hidden, weight = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss = FusedLinearKDLoss(ForwardKLLoss(temperature=temperature) if teacher_hidden is not None else None,
                             chunk_size=64, student_softcap=caps[0], teacher_softcap=caps[1], compile=compile)
    ce, kd = loss(hidden, weight, teacher_hidden, teacher_weight, labels, kd_ratio=ratio)
    ((1 - ratio) * ce + ratio * kd).backward()
    return ce.detach(), kd.detach(), hidden.grad, weight.grad


def fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("loss compile")]


def relative(got, want):
    """Norm-wise relative error, so that a handful of tiny entries cannot decide it."""
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


CASES = {  # name -> (teacher, kd_ratio, temperature, (student cap, teacher cap))
    "forward_kl": (True, 0.5, 1.0, (None, None)),
    "temperature_2": (True, 0.3, 2.0, (None, None)),
    "softcapped": (True, 0.5, 1.0, (20.0, 30.0)),
    "cross_entropy": (False, 0.0, 1.0, (None, None)),
}
# The stated bounds, against float64 from the same (rounded) inputs. fp32: round-off (measured
# about 1e-7 in values, 1e-6 in gradients). bf16: the head GEMMs write bf16 logits (8 bits of
# mantissa) and the gradients' GEMMs take bf16 operands, so the bound is bf16's own (measured about
# 1e-4 in the losses, 4e-3 in the gradients); the loss math itself stays float32 in both.
BOUNDS = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager_and_stays_within_its_bound_of_float64(case, dtype):
    with_teacher, ratio, temperature, caps = CASES[case]
    hidden, weight, teacher_hidden, teacher_weight, labels = inputs(dtype)
    if not with_teacher:
        teacher_hidden = teacher_weight = None
    args = (hidden, weight, teacher_hidden, teacher_weight, labels, ratio, temperature, caps)
    want = reference(*args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fused(True, *args)
    assert not fallbacks(caught)  # compiling works here: no fallback to the eager math
    eager = fused(False, *args)
    value_bound, grad_bound = BOUNDS[dtype]
    for name, got, other, ref in zip(("ce", "kd", "hidden grad", "weight grad"), compiled, eager, want):
        bound = value_bound if name in ("ce", "kd") else grad_bound
        if float(ref.norm()) == 0:
            assert float(got.norm()) == 0, name
            continue
        assert relative(got, ref) < bound, (name, relative(got, ref))
        # the compiled math is the eager math, reassociated: as close to it as either is to float64
        assert relative(got, other.double()) < bound, (name, relative(got, other.double()))


def test_a_failing_compiler_is_one_warning_and_the_eager_result(monkeypatch):
    hidden, weight, teacher_hidden, teacher_weight, labels = inputs(torch.float32)
    args = (hidden, weight, teacher_hidden, teacher_weight, labels, 0.5, 1.0, (None, None))

    def broken(fn, **kwargs):
        def call(*a):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return call

    monkeypatch.setattr(fused_block.torch, "compile", broken)
    with pytest.warns(UserWarning, match=r"^loss compile: torch.compile of the fused loss failed, running it "
                                         r"eagerly \(RuntimeError: no C\+\+ compiler found\); compile_loss: false"):
        got = fused(True, *args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = fused(True, *args)
    assert not fallbacks(caught)  # said once: the next call goes straight to the eager math
    monkeypatch.undo()
    want = fused(False, *args)
    for a, b, c in zip(got, again, want):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("compile", [True, False])
def test_the_compiled_math_runs_only_when_asked_and_only_for_gradients(monkeypatch, compile):
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return None  # as if compiling had failed: the eager math runs

    monkeypatch.setattr("kdtune.losses.fused.compiled_block_math", spy)
    g = torch.Generator().manual_seed(0)
    vocab = 64
    hidden, weight = torch.randn(3, 8, generator=g, requires_grad=True), torch.randn(vocab, 8, generator=g)
    loss = FusedLinearKDLoss(ForwardKLLoss(), compile=compile)
    ce, kd = loss(hidden, weight, torch.randn(3, 8, generator=g), torch.randn(vocab, 8, generator=g),
                  torch.tensor([0, 1, 2]), kd_ratio=0.5)
    (0.5 * ce + 0.5 * kd).backward()
    assert bool(calls) == compile
    # no gradient wanted (validation): the eager sums, never the compiled gradient
    calls.clear()
    with torch.no_grad():
        loss(hidden, weight, torch.randn(3, 8, generator=g), torch.randn(vocab, 8, generator=g),
             torch.tensor([0, 1, 2]), kd_ratio=0.5)
    assert not calls
