"""Full, chunked and fused forms: same values and gradients; normalization across micro-batches."""

import warnings

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
    TVDLoss,
    count_valid_tokens,
)

DIVERGENCES = [
    lambda: ForwardKLLoss(temperature=2.0),
    lambda: ReverseKLLoss(),
    lambda: GeneralizedJSDLoss(beta=0.3, temperature=0.7),
    lambda: SkewForwardKLLoss(alpha=0.2),
    lambda: SkewReverseKLLoss(alpha=0.1, temperature=1.5),
    lambda: TVDLoss(),
]
B, S, V, D_S, D_T = 2, 13, 31, 8, 12


@pytest.fixture(autouse=True, params=["summed", "kept"])
def weight_gradient_path(request, monkeypatch):
    """Every test here on both of the fused form's ways to its weight gradient: chunk products summed
    into a [V, d] sum, or every chunk's logit gradient kept for one GEMM in backward (the shapes here
    would pick either by memory alone)."""
    monkeypatch.setattr("kdtune.losses.fused._keeps_logit_grads", lambda *args: request.param == "kept")
    return request.param


def make_heads(dtype=torch.float64, seed=0, vocab_s=V, vocab_t=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D_S, generator=g).to(dtype)
    weight = torch.randn(vocab_s, D_S, generator=g).to(dtype)
    t_hidden = torch.randn(B, S, D_T, generator=g).to(dtype)
    t_weight = torch.randn(vocab_t, D_T, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = -100
    labels[1, -1] = -100
    return hidden, weight, t_hidden, t_weight, labels


def full_loss(div, kd_ratio, hidden, weight, t_hidden, t_weight, labels):
    logits = hidden @ weight.T
    t_logits = t_hidden @ t_weight.T
    ce = CrossEntropyLoss(vocab_size=div.vocab_size)(logits, labels)
    return (1 - kd_ratio) * ce + kd_ratio * div(logits, t_logits, labels)


def chunked_loss(div, kd_ratio, hidden, weight, t_hidden, t_weight, labels, size=4):
    chunks = [h @ weight.T for h in hidden.split(size, dim=1)]  # 13 = 4 + 4 + 4 + 1
    t_chunks = [h @ t_weight.T for h in t_hidden.split(size, dim=1)]
    ce = CrossEntropyLoss(vocab_size=div.vocab_size)(chunks, labels)
    return (1 - kd_ratio) * ce + kd_ratio * div(chunks, t_chunks, labels)


def fused_loss(div, kd_ratio, hidden, weight, t_hidden, t_weight, labels, chunk_size=5):
    ce, kd = FusedLinearKDLoss(div, chunk_size=chunk_size)(hidden, weight, t_hidden, t_weight, labels,
                                                          kd_ratio=kd_ratio)
    return (1 - kd_ratio) * ce + kd_ratio * kd


def value_and_grads(form, div, kd_ratio, trainable_weight, dtype=torch.float64):
    hidden, weight, t_hidden, t_weight, labels = make_heads(dtype)
    hidden.requires_grad_()
    weight.requires_grad_(trainable_weight)
    loss = form(div, kd_ratio, hidden, weight, t_hidden, t_weight, labels)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("trainable_weight", [True, False])
@pytest.mark.parametrize("make_div", DIVERGENCES)
def test_three_forms_agree(make_div, trainable_weight):
    div = make_div()
    ref = value_and_grads(full_loss, div, 0.4, trainable_weight)
    for form in (chunked_loss, fused_loss):
        got = value_and_grads(form, div, 0.4, trainable_weight)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
        if trainable_weight:
            torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)
        else:
            assert got[2] is None


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_fused_chunk_sizes(chunk_size):
    div = GeneralizedJSDLoss(beta=0.5)
    ref = value_and_grads(full_loss, div, 0.5, True)
    got = value_and_grads(lambda *a: fused_loss(*a, chunk_size=chunk_size), div, 0.5, True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_forms_agree():
    div = ForwardKLLoss()
    ref = value_and_grads(full_loss, div, 0.5, True, dtype=torch.bfloat16)
    got = value_and_grads(fused_loss, div, 0.5, True, dtype=torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=2e-3)


def test_fused_pure_cross_entropy_without_teacher():
    hidden, weight, _, _, labels = make_heads()
    hidden.requires_grad_()
    ce, kd = FusedLinearKDLoss(ForwardKLLoss(), chunk_size=3)(hidden, weight, None, None, labels, kd_ratio=0.0)
    loss = ce
    expected = CrossEntropyLoss()(hidden @ weight.T, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert kd.item() == 0.0 and ce.item() == pytest.approx(expected.item())
    (grad,) = torch.autograd.grad(loss, hidden)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_fused_gradcheck():
    hidden, weight, t_hidden, t_weight, labels = make_heads()
    fused = FusedLinearKDLoss(GeneralizedJSDLoss(beta=0.4, temperature=1.5), chunk_size=6)

    def mixed(h, w):
        ce, kd = fused(h, w, t_hidden[:, :5], t_weight, labels[:, :5], kd_ratio=0.7)
        return 0.3 * ce + 0.7 * kd

    inputs = (hidden[:, :5].clone().requires_grad_(), weight.clone().requires_grad_())
    assert torch.autograd.gradcheck(mixed, inputs)


def test_gradient_accumulation_with_step_token_count():
    """Two micro-batches normalized by the step's token count give the whole batch's gradient."""
    div = SkewForwardKLLoss(alpha=0.1)
    hidden, weight, t_hidden, t_weight, labels = make_heads()
    weight.requires_grad_()
    fused = FusedLinearKDLoss(div, chunk_size=4)
    sum(fused(hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.5)).mul(0.5).backward()
    expected = weight.grad.clone()
    weight.grad = None
    total = count_valid_tokens(labels)
    for i in range(B):
        part = slice(i, i + 1)
        ce, kd = fused(hidden[part], weight, t_hidden[part], t_weight, labels[part], kd_ratio=0.5,
                       num_valid_tokens=total)
        (0.5 * ce + 0.5 * kd).backward()
    torch.testing.assert_close(weight.grad, expected, rtol=1e-12, atol=1e-12)
    # the same with the sum reduction of the full form, divided afterwards
    summed = full_loss(ForwardKLLoss(reduction="sum"), 1.0, hidden, weight, t_hidden, t_weight, labels)
    torch.testing.assert_close(summed / total, full_loss(ForwardKLLoss(), 1.0, hidden, weight, t_hidden, t_weight, labels))


def test_fused_sum_reduction():
    hidden, weight, t_hidden, t_weight, labels = make_heads()
    loss = FusedLinearKDLoss(TVDLoss(reduction="sum"))(hidden, weight, t_hidden, t_weight, labels, kd_ratio=1.0)[1]
    expected = TVDLoss(reduction="sum")(hidden @ weight.T, t_hidden @ t_weight.T, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_fused_vocab_padding():
    """Padded output rows (student 31+3, teacher 31+7) are cut to vocab_size and get zero gradient."""
    hidden, weight, t_hidden, t_weight, labels = make_heads(vocab_s=V + 3, vocab_t=V + 7)
    weight.requires_grad_()
    div = ReverseKLLoss(vocab_size=V)
    loss = fused_loss(div, 0.5, hidden, weight, t_hidden, t_weight, labels)
    loss.backward()
    expected = full_loss(ReverseKLLoss(), 0.5, hidden, weight[:V], t_hidden, t_weight[:V], labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(weight.grad[V:], torch.zeros_like(weight.grad[V:]))


def test_fused_no_valid_token():
    hidden, weight, t_hidden, t_weight, labels = make_heads()
    hidden.requires_grad_(), weight.requires_grad_()  # the weight's gradient starts unwritten: must come out 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ce, kd = FusedLinearKDLoss(ForwardKLLoss())(hidden, weight, t_hidden, t_weight,
                                                    torch.full_like(labels, -100), kd_ratio=0.5)
        loss = 0.5 * ce + 0.5 * kd
    assert loss.item() == 0.0 and len(caught) == 1
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_fused_teacher_is_constant():
    hidden, weight, t_hidden, t_weight, labels = make_heads()
    hidden.requires_grad_()
    t_hidden.requires_grad_()
    t_weight.requires_grad_()
    ce, kd = FusedLinearKDLoss(ForwardKLLoss())(hidden, weight, t_hidden, t_weight, labels, kd_ratio=0.5)
    (0.5 * ce + 0.5 * kd).backward()
    assert t_hidden.grad is None and t_weight.grad is None and hidden.grad is not None

