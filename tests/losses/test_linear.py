"""The losses a recipe's step calls (`LinearKDLoss`, `LinearCrossEntropyLoss`): every form gives the
terms a float64 reference written here gives, with the step's kd_ratio and temperature per call; the
fused form refuses a mix it did not differentiate instead of returning a wrong gradient."""

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import KDTuneError
from kdtune.losses import (
    FORMS,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LinearCrossEntropyLoss,
    LinearKDLoss,
    TeacherTopK,
)
from tests.losses.random_heads import random_heads

B, S, V, D_S, D_T = 2, 11, 29, 6, 10


def heads(seed=0):
    return random_heads(B, S, V, D_S, D_T, seed=seed, ignored=(0, 3))


def reference_terms(hidden, weight, t_hidden, t_weight, labels, temperature, num_tokens):
    """CE and forward KL(p_T || q_T) summed over trained tokens and divided by num_tokens, from their
    definitions."""
    keep = labels != -100
    logits = (hidden @ weight.T)[keep]
    ce = F.cross_entropy(logits, labels[keep], reduction="sum") / num_tokens
    log_q = (logits / temperature).log_softmax(-1)
    log_p = ((t_hidden @ t_weight.T)[keep] / temperature).log_softmax(-1)
    kd = (log_p.exp() * (log_p - log_q)).sum() / num_tokens
    return ce, kd


@pytest.mark.parametrize("form", FORMS)
def test_terms_and_gradients_equal_the_reference_with_per_call_ratio_and_temperature(form):
    hidden, weight, t_hidden, t_weight, labels = heads()
    num_tokens = int((labels != -100).sum()) + 5  # the step has tokens in other micro-batches too
    loss_fn = LinearKDLoss(ForwardKLLoss(temperature=1.0), form=form, chunk_size=4, num_chunks=3)
    ce, kd = loss_fn(hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.3, num_tokens=num_tokens,
                     temperature=2.0)
    loss = 0.7 * ce + 0.3 * kd
    grads = torch.autograd.grad(loss, (hidden, weight))
    want_ce, want_kd = reference_terms(hidden, weight, t_hidden, t_weight, labels, 2.0, num_tokens)
    want_grads = torch.autograd.grad(0.7 * want_ce + 0.3 * want_kd, (hidden, weight))
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd, want_kd, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_a_cached_teacher_gives_the_same_terms_in_every_form(form):
    hidden, weight, t_hidden, t_weight, labels = heads(1)
    log_p = (t_hidden @ t_weight.T).log_softmax(-1)
    values, ids = log_p.topk(8, dim=-1)
    cached = TeacherTopK(values, ids)
    divergence = GeneralizedJSDLoss(beta=0.4)
    ref = LinearKDLoss(divergence, form="full")(hidden, weight, cached, None, labels, kd_ratio=0.5, num_tokens=7)
    got = LinearKDLoss(divergence, form=form, chunk_size=3)(hidden, weight, cached, None, labels, kd_ratio=0.5,
                                                             num_tokens=7)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(KDTuneError, match="temperature of the teacher cache"):
        LinearKDLoss(divergence, form=form)(hidden, weight, cached, None, labels, kd_ratio=0.5, num_tokens=7,
                                            temperature=2.0)


def test_the_fused_form_refuses_a_mix_it_did_not_differentiate():
    hidden, weight, t_hidden, t_weight, labels = heads(2)
    fused = LinearKDLoss(ForwardKLLoss(), form="fused", chunk_size=4)
    full = LinearKDLoss(ForwardKLLoss(), form="full")
    args = (hidden, weight, t_hidden, t_weight, labels)
    # A multiple of the mix, plus a term of its own: the gradient of exactly that.
    ce, kd = fused(*args, kd_ratio=0.25, num_tokens=9)
    got = torch.autograd.grad(3 * (0.75 * ce + 0.25 * kd) + hidden.pow(2).sum(), hidden)[0]
    ce, kd = full(*args, kd_ratio=0.25, num_tokens=9)
    want = torch.autograd.grad(3 * (0.75 * ce + 0.25 * kd) + hidden.pow(2).sum(), hidden)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    ce, kd = fused(*args, kd_ratio=0.25, num_tokens=9)
    with pytest.raises(KDTuneError, match=r"kd_ratio=0.25.*\(1 - kd_ratio\) \* ce \+ kd_ratio \* kd"):
        (0.5 * ce + 0.5 * kd).backward()


def test_without_gradients_no_gradient_is_computed():
    hidden, weight, t_hidden, t_weight, labels = heads(3)
    fused = LinearKDLoss(ForwardKLLoss(), form="fused", chunk_size=4)
    with_grad = fused(hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.5, num_tokens=10)
    with torch.no_grad():
        without = fused(hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.5, num_tokens=10)
    assert not any(t.requires_grad for t in without)
    for a, b in zip(without, with_grad):  # autograd's path and the closed form's: the same up to rounding
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", FORMS)
def test_cross_entropy_of_supervised_fine_tuning(form):
    hidden, weight, _, _, labels = heads(4)
    ce = LinearCrossEntropyLoss(form=form, chunk_size=5, num_chunks=2)(hidden, weight, labels, num_tokens=30)
    keep = labels != -100
    want = F.cross_entropy((hidden @ weight.T)[keep], labels[keep], reduction="sum") / 30
    torch.testing.assert_close(ce, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ce, hidden)[0], torch.autograd.grad(want, hidden)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "abc", None])
def test_a_kd_ratio_outside_0_1_is_refused(bad):
    hidden, weight, t_hidden, t_weight, labels = heads()
    for form in FORMS:
        with pytest.raises(KDTuneError, match="kd_ratio"):
            LinearKDLoss(ForwardKLLoss(), form=form)(hidden, weight, t_hidden, t_weight, labels, kd_ratio=bad,
                                                     num_tokens=5)


def test_logit_gradients_are_kept_only_where_they_take_no_more_memory():
    from kdtune.losses.fused import _keeps_logit_grads

    d, chunk = 16, 8
    for dtype, most in ((torch.bfloat16, 2 * d + chunk), (torch.float32, d + chunk), (torch.float64, d + chunk)):
        weight = torch.zeros(100, d, dtype=dtype)
        assert _keeps_logit_grads(torch.zeros(most, d, dtype=dtype), weight, chunk)
        assert not _keeps_logit_grads(torch.zeros(most + 1, d, dtype=dtype), weight, chunk)
        assert _keeps_logit_grads(torch.zeros(3, d, dtype=dtype), weight, chunk)  # fewer tokens than a chunk
    # autocast makes bf16 logits from float32 weights: the float32 sum, whose products are bf16
    weight, rows = torch.zeros(100, d), torch.zeros(4, d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _keeps_logit_grads(rows, weight, chunk)
    assert _keeps_logit_grads(rows, weight, chunk)
    assert not _keeps_logit_grads(rows.bfloat16(), weight, chunk)  # rows in another dtype than the weight
