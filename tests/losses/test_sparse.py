"""Sparse top-k teacher: k = V equals the dense loss; k < V matches the tail-bucket formula."""

import numpy as np
import pytest
import torch

from kdtune.losses import (
    CrossEntropyLoss,
    ForwardKLLoss,
    FusedLinearKDLoss,
    GeneralizedJSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TeacherTopK,
    TVDLoss,
)
from tests.losses.loss_reference import divergence, softmax

CASES = [
    ("forward_kl", lambda: ForwardKLLoss(), {}),
    ("reverse_kl", lambda: ReverseKLLoss(), {}),
    ("jsd", lambda: GeneralizedJSDLoss(beta=0.4), {"beta": 0.4}),
    ("jsd", lambda: GeneralizedJSDLoss(beta=0.0), {"beta": 0.0}),
    ("skew_forward_kl", lambda: SkewForwardKLLoss(alpha=0.1), {"alpha": 0.1}),
    ("skew_reverse_kl", lambda: SkewReverseKLLoss(alpha=0.2), {"alpha": 0.2}),
    ("tvd", lambda: TVDLoss(), {}),
]
IDS = [f"{name}-{kw}" for name, _, kw in CASES]
B, S, V = 2, 6, 17


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, S, V, generator=g)).to(dtype)
    teacher = (2 * torch.randn(B, S, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 0] = labels[1, 3] = -100
    return student, teacher, labels


def top_k(teacher, k):
    logprobs, ids = teacher.log_softmax(-1).topk(k, dim=-1)
    return TeacherTopK(logprobs, ids)


@pytest.mark.parametrize(("name", "make_div", "kw"), CASES, ids=IDS)
def test_k_equal_vocab_is_dense(name, make_div, kw):
    student, teacher, labels = make()
    # a random order of all V ids, not the sorted one
    perm = torch.rand(B, S, V, generator=torch.Generator().manual_seed(1)).argsort(-1)
    sparse = TeacherTopK(teacher.log_softmax(-1).gather(-1, perm), perm)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense_value = make_div()(s1, teacher, labels)
    sparse_value = make_div()(s2, sparse, labels)
    dense_value.backward()
    sparse_value.backward()
    torch.testing.assert_close(sparse_value, dense_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("name", "make_div", "kw"), CASES, ids=IDS)
def test_tail_bucket_formula(name, make_div, kw):
    """k < V: the divergence between the (k + 1)-way distributions, written out with probabilities."""
    student, teacher, labels = make(seed=2)
    k = 5
    sparse = top_k(teacher, k)
    values = []
    for s, t, y in zip(student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1).tolist()):
        if y == -100:
            continue
        p, q = softmax(t.double().numpy()), softmax(s.double().numpy())
        ids = np.argsort(-p)[:k]
        rest = np.setdiff1d(np.arange(V), ids)
        p_b = np.append(p[ids], 1 - p[ids].sum())
        q_b = np.append(q[ids], q[rest].sum())
        values.append(divergence(name, p_b, q_b, **kw))
    assert make_div()(student, sparse, labels).item() == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6)


def test_sparse_is_a_lower_bound_of_dense():
    """Data-processing inequality: coarsening to k + 1 outcomes can only shrink an f-divergence."""
    student, teacher, labels = make(seed=3)
    for _, make_div, _ in CASES:
        dense = make_div()(student, teacher, labels)
        assert make_div()(student, top_k(teacher, 4), labels) <= dense + 1e-6


def test_student_masked_outside_top_k_no_nan():
    student, teacher, labels = make(seed=4)
    sparse = top_k(teacher, 6)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, sparse.ids, False)
    student = student.masked_fill(outside, float("-inf")).requires_grad_()
    value = GeneralizedJSDLoss(beta=0.5)(student, sparse, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("trainable_weight", [True, False])
def test_fused_and_chunked_with_sparse_teacher(trainable_weight):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, S, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=trainable_weight)
    _, teacher, labels = make(seed=5, dtype=torch.float64)
    sparse = top_k(teacher, 4)
    div = SkewForwardKLLoss(alpha=0.1)

    def full():
        logits = hidden @ weight.T
        return 0.5 * CrossEntropyLoss()(logits, labels) + 0.5 * div(logits, sparse, labels)

    def chunked():
        chunks = [h @ weight.T for h in hidden.split(4, dim=1)]
        return 0.5 * CrossEntropyLoss()(chunks, labels) + 0.5 * div(chunks, sparse, labels)

    def fused():
        ce, kd = FusedLinearKDLoss(div, chunk_size=3)(hidden, weight, sparse, None, labels, kd_ratio=0.5)
        return 0.5 * ce + 0.5 * kd

    params = [hidden, weight] if trainable_weight else [hidden]
    expected = full()
    expected_grads = torch.autograd.grad(expected, params)
    for form in (chunked, fused):
        value = form()
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip(torch.autograd.grad(value, params), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
