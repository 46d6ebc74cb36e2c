"""Each loss against a textbook float64 formula; gradients by gradcheck; edge cases."""

import math
import warnings

import numpy as np
import pytest
import torch

from kdtune.errors import KDTuneError
from kdtune.losses import (
    CrossEntropyLoss,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
    count_valid_tokens,
)
from tests.losses.loss_reference import mean_cross_entropy, mean_loss

# name, class, constructor kwargs (also passed to the reference)
CASES = [
    ("forward_kl", ForwardKLLoss, {}),
    ("reverse_kl", ReverseKLLoss, {}),
    ("jsd", GeneralizedJSDLoss, {"beta": 0.5}),
    ("jsd", GeneralizedJSDLoss, {"beta": 0.2}),
    ("jsd", GeneralizedJSDLoss, {"beta": 0.0}),
    ("jsd", GeneralizedJSDLoss, {"beta": 1.0}),
    ("skew_forward_kl", SkewForwardKLLoss, {"alpha": 0.1}),
    ("skew_reverse_kl", SkewReverseKLLoss, {"alpha": 0.3}),
    ("tvd", TVDLoss, {}),
]
IDS = [f"{name}-{kw}" for name, _, kw in CASES]
# Divergences that stay finite when only the student (resp. only the teacher) has -inf entries.
FINITE_STUDENT_MASK = {"reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}
FINITE_TEACHER_MASK = {"forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}


def make_batch(B=2, S=7, V=23, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, S, V, generator=g)).to(dtype)
    teacher = (2 * torch.randn(B, S, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return student, teacher, labels


def reference(name, student, teacher, labels, temperature, **kw):
    rows = lambda x: x.reshape(-1, x.shape[-1]).double().numpy()  # noqa: E731
    return mean_loss(name, rows(student), rows(teacher), labels.reshape(-1).tolist(), temperature, **kw)


def jsd_endpoint_ok(name, kw, one_sided):
    """JSD endpoints are plain KLs, so they are finite only on the matching one-sided mask."""
    if name != "jsd" or kw["beta"] not in (0.0, 1.0):
        return True
    return (kw["beta"] == 0.0) == (one_sided == "teacher")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize(("name", "cls", "kw"), CASES, ids=IDS)
def test_matches_formula(name, cls, kw, temperature):
    student, teacher, labels = make_batch()
    value = cls(temperature=temperature, **kw)(student, teacher, labels)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(name, student, teacher, labels, temperature, **kw), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("masked", ["both", "student", "teacher"])
@pytest.mark.parametrize(("name", "cls", "kw"), CASES, ids=IDS)
def test_neg_inf_logits_no_nan(name, cls, kw, masked):
    if masked == "student" and (name not in FINITE_STUDENT_MASK or not jsd_endpoint_ok(name, kw, masked)):
        pytest.skip("the divergence is infinite when only the student masks an entry")
    if masked == "teacher" and (name not in FINITE_TEACHER_MASK or not jsd_endpoint_ok(name, kw, masked)):
        pytest.skip("the divergence is infinite when only the teacher masks an entry")
    student, teacher, labels = make_batch(seed=1)
    mask = torch.zeros_like(student, dtype=torch.bool)
    mask[..., -5:] = True  # a masked vocabulary tail
    mask[0, 3, :4] = True  # and a few entries of one token
    if masked in ("both", "student"):
        student = student.masked_fill(mask, float("-inf"))
    if masked in ("both", "teacher"):
        teacher = teacher.masked_fill(mask, float("-inf"))
    student.requires_grad_()
    value = cls(temperature=1.5, **kw)(student, teacher, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    assert value.item() == pytest.approx(reference(name, student.detach(), teacher, labels, 1.5, **kw), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("name", "cls", "kw"), CASES, ids=IDS)
def test_gradcheck(name, cls, kw):
    student, teacher, labels = make_batch(B=1, S=5, V=6, seed=2, dtype=torch.float64)
    student[0, 1, 0] = float("-inf")
    teacher[0, 1, 0] = float("-inf")
    loss = cls(temperature=1.3, **kw)
    finite = torch.isfinite(student)

    def f(x):  # perturb only the finite entries
        return loss(student.masked_scatter(finite, x), teacher, labels)

    assert torch.autograd.gradcheck(f, (student[finite].clone().requires_grad_(),))


def test_cross_entropy_matches_formula_and_gradcheck():
    student, _, labels = make_batch()
    ref = mean_cross_entropy(student.reshape(-1, student.shape[-1]).double().numpy(), labels.reshape(-1).tolist())
    assert CrossEntropyLoss()(student, labels).item() == pytest.approx(ref, rel=1e-6)
    small, _, small_labels = make_batch(B=1, S=5, V=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: CrossEntropyLoss()(x, small_labels), (small.requires_grad_(),))


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher, labels = make_batch(seed=3)
    fkl = ForwardKLLoss(temperature=2.0)(student, teacher, labels)
    rkl = ReverseKLLoss(temperature=2.0)(student, teacher, labels)
    assert torch.equal(GeneralizedJSDLoss(beta=0.0, temperature=2.0)(student, teacher, labels), fkl)
    assert torch.equal(GeneralizedJSDLoss(beta=1.0, temperature=2.0)(student, teacher, labels), rkl)
    assert torch.equal(SkewForwardKLLoss(alpha=0.0, temperature=2.0)(student, teacher, labels), fkl)


def test_perfect_student_scores_zero():
    student, _, labels = make_batch()
    for _, cls, kw in CASES:
        assert cls(**kw)(student, student.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)


def test_bf16_inputs_computed_in_float32():
    student, teacher, labels = make_batch(seed=4)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    value = GeneralizedJSDLoss(beta=0.3)(s16, t16, labels)
    assert value.dtype == torch.float32
    ref = reference("jsd", s16.float(), t16.float(), labels, 1.0, beta=0.3)
    assert value.item() == pytest.approx(ref, rel=1e-5)
    s16.requires_grad_()
    GeneralizedJSDLoss()(s16, t16, labels).backward()
    assert s16.grad.dtype == torch.bfloat16


def test_no_valid_token_gives_zero_and_one_warning():
    student, teacher, labels = make_batch()
    labels = torch.full_like(labels, -100)
    student.requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = ForwardKLLoss()(student, teacher, labels)
    assert value.item() == 0.0 and len(caught) == 1 and "no token" in str(caught[0].message)
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sum_reduction_and_valid_count():
    student, teacher, labels = make_batch()
    n = count_valid_tokens(labels)
    assert n == int((labels != -100).sum()) == 11
    total = TVDLoss(reduction="sum")(student, teacher, labels)
    assert total.item() == pytest.approx(TVDLoss()(student, teacher, labels).item() * n, rel=1e-6)


def test_vocab_padding_is_cut():
    student, teacher, labels = make_batch(V=20)
    padded_student = torch.cat([student, torch.randn(2, 7, 4)], -1)  # 24 rows, 4 of padding
    padded_teacher = torch.cat([teacher, torch.randn(2, 7, 12)], -1)  # 32 rows
    expected = ForwardKLLoss()(student, teacher, labels)
    assert torch.allclose(ForwardKLLoss(vocab_size=20)(padded_student, padded_teacher, labels), expected)
    # without vocab_size both are cut to the smaller width (24)
    cut = ForwardKLLoss()(padded_student, padded_teacher[..., :24], labels)
    assert torch.equal(ForwardKLLoss()(padded_student, padded_teacher, labels), cut)
    with pytest.raises(KDTuneError, match="vocab_size=30"):
        ForwardKLLoss(vocab_size=30)(padded_student, padded_teacher, labels)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: GeneralizedJSDLoss(beta=1.5), "beta"),
        (lambda: SkewReverseKLLoss(alpha=-0.1), "alpha"),
        (lambda: ForwardKLLoss(temperature=0), "temperature"),
        (lambda: TVDLoss(reduction="avg"), "reduction"),
    ],
)
def test_bad_settings_are_user_errors(make, key):
    with pytest.raises(KDTuneError, match=key):
        make()


def test_teacher_gets_no_gradient():
    student, teacher, labels = make_batch()
    teacher.requires_grad_()
    student.requires_grad_()
    ReverseKLLoss()(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None
    assert math.isfinite(float(np.abs(student.grad.numpy()).sum()))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_kl_closed_form_gradient_matches_autograd(temperature, masked):
    """The fused loss's closed form (q_T - p_T) / T against autograd through the per-token formula."""
    student, teacher, _ = make_batch(dtype=torch.float64)
    student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    if masked:  # entries the teacher rules out (p = 0) contribute nothing, not NaN
        teacher[:, :3] = -math.inf
    loss = ForwardKLLoss()
    total, q_t, p_t = loss.sum_and_probs(student, teacher, temperature=temperature)
    grad = (q_t - p_t) / temperature
    leaf = student.clone().requires_grad_()
    expected = loss.token_values(leaf, teacher, temperature=temperature).sum()
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    assert torch.isfinite(total)
    torch.testing.assert_close(total, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    q_t = (student / temperature).softmax(-1)  # the textbook form, independently
    torch.testing.assert_close(grad, (q_t - (teacher / temperature).softmax(-1)) / temperature, rtol=1e-12, atol=1e-12)
