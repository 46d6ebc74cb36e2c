"""Final-logit softcapping (Gemma 2) in every loss form: values and gradients equal a float64
reference that caps each model's logits with its own cap before the temperature, for dense and
cached teachers, closed-form and autograd divergences; and leaving the cap out would be caught."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdtune.checkpointing import load_model
from kdtune.errors import KDTuneError
from kdtune.losses import FORMS, ForwardKLLoss, GeneralizedJSDLoss, LinearCrossEntropyLoss, LinearKDLoss, TeacherTopK
from kdtune.offline.writer import teacher_topk
from tests.losses import loss_reference
from tests.losses.random_heads import random_heads
from tests.models.tiny import make_checkpoint

B, S, V, D_S, D_T = 2, 9, 31, 6, 10
STUDENT_CAP, TEACHER_CAP = 2.5, 4.0  # different caps, both below the logits' spread so they bite


def heads(seed=0):
    return random_heads(B, S, V, D_S, D_T, seed=seed, ignored=(1, 2))


def capped(logits, cap):
    return cap * torch.tanh(logits / cap)


def reference(hidden, weight, teacher_logits, labels, *, name, temperature, num_tokens, caps=True, beta=0.5):
    """(ce, kd) from the definitions in float64: each model's logits capped by its cap, then tempered;
    forward KL or the generalized JSD written with probabilities."""
    keep = labels != -100
    logits = (hidden @ weight.T)[keep]
    teacher_logits = teacher_logits[keep]
    if caps:
        logits, teacher_logits = capped(logits, STUDENT_CAP), capped(teacher_logits, TEACHER_CAP)
    ce = F.cross_entropy(logits, labels[keep], reduction="sum") / num_tokens
    q = (logits / temperature).softmax(-1)
    p = (teacher_logits / temperature).softmax(-1)
    if name == "forward_kl":
        kd = (p * (p.log() - q.log())).sum()
    else:
        m = beta * p + (1 - beta) * q
        kd = (beta * p * (p.log() - m.log()) + (1 - beta) * q * (q.log() - m.log())).sum()
    return ce, kd / num_tokens


DIVERGENCES = {"forward_kl": ForwardKLLoss, "jsd": lambda **kw: GeneralizedJSDLoss(beta=0.5, **kw)}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("form", FORMS)
def test_capped_terms_and_gradients_equal_the_float64_reference(form, name, temperature):
    hidden, weight, t_hidden, t_weight, labels = heads()
    num_tokens = int((labels != -100).sum()) + 3
    loss_fn = LinearKDLoss(DIVERGENCES[name](), form=form, chunk_size=4, num_chunks=3,
                           student_softcap=STUDENT_CAP, teacher_softcap=TEACHER_CAP)
    ce, kd = loss_fn(hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.3, num_tokens=num_tokens,
                     temperature=temperature)
    grads = torch.autograd.grad(0.7 * ce + 0.3 * kd, (hidden, weight))
    want_ce, want_kd = reference(hidden, weight, t_hidden @ t_weight.T, labels, name=name, temperature=temperature,
                                 num_tokens=num_tokens)
    want = torch.autograd.grad(0.7 * want_ce + 0.3 * want_kd, (hidden, weight))
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd, want_kd, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the textbook divergence (numpy, explicit sums) of the capped logits agrees as well
    keep = (labels != -100).reshape(-1)
    rows = lambda x: x.detach().reshape(-1, V)[keep].numpy()  # noqa: E731
    student, teacher = rows(capped(hidden @ weight.T, STUDENT_CAP)), rows(capped(t_hidden @ t_weight.T, TEACHER_CAP))
    textbook = loss_reference.mean_loss(name, student, teacher, np.zeros(len(student)), temperature, beta=0.5)
    assert float(kd.detach()) * num_tokens / len(student) == pytest.approx(textbook, rel=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_leaving_a_cap_out_changes_the_loss(form):
    """The check above can fail: with either cap dropped the terms differ from the capped reference
    by far more than its tolerance."""
    hidden, weight, t_hidden, t_weight, labels = heads(1)
    want_ce, want_kd = reference(hidden, weight, t_hidden @ t_weight.T, labels, name="forward_kl", temperature=1.0,
                                 num_tokens=10)
    for caps in ({"student_softcap": STUDENT_CAP}, {"teacher_softcap": TEACHER_CAP}, {}):
        ce, kd = LinearKDLoss(ForwardKLLoss(), form=form, chunk_size=4, **caps)(
            hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.5, num_tokens=10)
        assert abs(float(kd) - float(want_kd)) > 0.05 * float(want_kd), caps
        if "student_softcap" not in caps:
            assert abs(float(ce) - float(want_ce)) > 0.05 * float(want_ce), caps


@pytest.mark.parametrize("form", FORMS)
def test_a_cached_capped_teacher_with_a_capped_student(form):
    """A cache holds the teacher's top-k of its capped logits; the student's cap still applies in the
    loss. With k = V the (k + 1)-outcome loss is the dense one, so the reference is the dense formula."""
    hidden, weight, t_hidden, t_weight, labels = heads(2)
    log_p = capped(t_hidden @ t_weight.T, TEACHER_CAP).log_softmax(-1)
    values, ids = log_p.topk(V, dim=-1)
    loss_fn = LinearKDLoss(GeneralizedJSDLoss(beta=0.3), form=form, chunk_size=5, student_softcap=STUDENT_CAP)
    ce, kd = loss_fn(hidden, weight, TeacherTopK(values, ids), None, labels, kd_ratio=0.4, num_tokens=12)
    grads = torch.autograd.grad(0.6 * ce + 0.4 * kd, (hidden, weight))
    want_ce, want_kd = reference(hidden, weight, t_hidden @ t_weight.T, labels, name="jsd", temperature=1.0,
                                 num_tokens=12, beta=0.3)
    want = torch.autograd.grad(0.6 * want_ce + 0.4 * want_kd, (hidden, weight))
    torch.testing.assert_close(kd, want_kd, rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_capped_cross_entropy_of_fine_tuning(form):
    hidden, weight, _, _, labels = heads(3)
    loss = LinearCrossEntropyLoss(form=form, chunk_size=4, softcap=STUDENT_CAP)(hidden, weight, labels, num_tokens=9)
    keep = labels != -100
    want = F.cross_entropy(capped(hidden @ weight.T, STUDENT_CAP)[keep], labels[keep], reduction="sum") / 9
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fused_capped_gradcheck():
    """The closed-form gradient through the cap, against finite differences."""
    hidden, weight, t_hidden, t_weight, labels = heads(4)
    loss_fn = LinearKDLoss(ForwardKLLoss(), form="fused", chunk_size=5, student_softcap=STUDENT_CAP,
                           teacher_softcap=TEACHER_CAP)

    def mixed(h, w):
        ce, kd = loss_fn(h, w, t_hidden, t_weight, labels, kd_ratio=0.5, num_tokens=10)
        return 0.5 * ce + 0.5 * kd

    assert torch.autograd.gradcheck(mixed, (hidden, weight))


def test_bf16_capped_fused_tracks_float32():
    hidden, weight, t_hidden, t_weight, labels = heads(5)
    caps = {"student_softcap": STUDENT_CAP, "teacher_softcap": TEACHER_CAP}
    args = [t.detach().float() for t in (hidden, weight, t_hidden, t_weight)]
    low = [t.bfloat16().requires_grad_(i < 2) for i, t in enumerate(args)]
    full = [t.requires_grad_(i < 2) for i, t in enumerate(args)]
    out = {}
    for name, (h, w, th, tw) in {"bf16": low, "fp32": full}.items():
        ce, kd = LinearKDLoss(ForwardKLLoss(), form="fused", chunk_size=4, **caps)(h, w, th, tw, labels, kd_ratio=0.5,
                                                                                  num_tokens=10)
        out[name] = (ce, kd, *torch.autograd.grad(0.5 * ce + 0.5 * kd, (h, w)))
    for a, b in zip(out["bf16"], out["fp32"]):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("bad", [0, -1.0, "30", True])
def test_a_bad_cap_is_refused(bad):
    with pytest.raises(KDTuneError, match="loss softcap"):
        LinearKDLoss(ForwardKLLoss(), student_softcap=bad)


def test_the_cache_writer_caps_the_teacher(tmp_path):
    """teacher_topk gives the top-k of the log-softmax of the model's own (capped) logits, at the
    cache's temperature: the cap before the temperature."""
    teacher = load_model(make_checkpoint("gemma2", tmp_path / "gemma2"))
    assert teacher.args.final_logit_softcapping == 3.0
    tokens = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[0, :4] = -100
    values, ids = teacher_topk(teacher, {"tokens": tokens, "labels": labels}, teacher.output_weight, 8, 2.0)
    with torch.no_grad():
        expected = (teacher(tokens)[labels != -100] / 2.0).log_softmax(-1).topk(8, dim=-1)
    torch.testing.assert_close(values, expected.values, rtol=0, atol=1e-6)
    assert torch.equal(ids, expected.indices)
