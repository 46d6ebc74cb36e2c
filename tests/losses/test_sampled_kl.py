"""Sampled-token reverse KL against float64 formulas: the per-token log-probabilities, each sample's
gradient (the score-function formula written out, with and without the other-sequences baseline),
and the estimator's expectation, which must be the gradient of the reverse KL (sampling at
temperature 1, and at 2 with importance weights)."""

import torch

from kdtune.losses import SampledReverseKLLoss, token_logprobs
from kdtune.modules.softcap import softcap

torch.manual_seed(0)


def test_token_logprobs_are_the_log_softmax_of_the_tokens_in_chunks():
    hidden = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)  # 2 padding rows past the vocabulary
    targets = torch.randint(0, 11, (37,))
    for cap, temperature in ((None, 1.0), (3.0, 2.0)):
        got = token_logprobs(hidden, weight, targets, vocab_size=11, softcap_value=cap, temperature=temperature,
                             chunk_size=5)
        want = (softcap(hidden @ weight[:11].T, cap) / temperature).log_softmax(-1)[torch.arange(37), targets]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.autograd.grad(got.sum(), (hidden, weight))
        w = torch.autograd.grad(want.sum(), (hidden, weight))
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_each_samples_gradient_is_the_score_function_formula():
    """d loss / d logits_t = -(1/N) * (A_t - b_t) * (onehot(y_t) - q_t), A_t = log p(y_t) - log q(y_t),
    b_t the mean advantage of the other sequences' tokens (0 without the baseline)."""
    rows, width, d, v = 3, 4, 6, 10
    for use_baseline in (False, True):
        hidden = torch.randn(rows, width, d, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, v, (rows, width))
        labels[0, 0] = labels[2, 1] = -100  # positions that predict no sampled token
        teacher = torch.randn(rows, width, v, dtype=torch.float64).log_softmax(-1)
        keep = labels != -100
        teacher_lp = teacher[keep].gather(-1, labels[keep][:, None])[:, 0]
        loss, estimate = SampledReverseKLLoss(chunk_size=3, baseline=use_baseline)(hidden, weight, teacher_lp, labels,
                                                                                   num_tokens=11)
        loss.backward()
        with torch.no_grad():
            logits = hidden[keep] @ weight.T
            q = logits.softmax(-1)
            log_q = logits.log_softmax(-1).gather(-1, labels[keep][:, None])[:, 0]
            advantage = teacher_lp - log_q
            sequence = keep.nonzero()[:, 0]
            baseline = torch.stack([advantage[sequence != s].mean() for s in sequence]) if use_baseline else 0.0
            onehot = torch.nn.functional.one_hot(labels[keep], v).double()
            g_logits = -((advantage - baseline)[:, None] * (onehot - q)) / 11
            g_hidden = torch.zeros_like(hidden)
            g_hidden[keep] = g_logits @ weight
            g_weight = g_logits.T @ hidden[keep]
        torch.testing.assert_close(hidden.grad, g_hidden, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(weight.grad, g_weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(estimate, (log_q - teacher_lp).sum() / 11)  # the estimate: no baseline in it


def reverse_kl_gradient_by_sampling(temperature: float, samples: int = 400_000, weighted: bool = True):
    """(Monte Carlo gradient of the estimator, exact gradient of KL(q || p)) for one position."""
    d, v = 5, 8
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(d, dtype=torch.float64, generator=generator)
    weight = torch.randn(v, d, dtype=torch.float64, generator=generator, requires_grad=True)
    log_p = torch.randn(v, dtype=torch.float64, generator=generator).log_softmax(-1)
    with torch.no_grad():  # draws from the student at the sampling temperature
        draws = torch.multinomial((weight @ h / temperature).softmax(-1), samples, replacement=True,
                                  generator=generator)
    hidden = h.expand(samples, d)
    told = temperature if weighted else 1.0  # unweighted: as if the draws were the student's own at 1
    loss, _ = SampledReverseKLLoss(chunk_size=65536)(hidden, weight, log_p[draws], draws, num_tokens=samples,
                                                     sampling_temperature=told)
    (estimated,) = torch.autograd.grad(loss, weight)
    log_q = (weight @ h).log_softmax(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    (exact,) = torch.autograd.grad(kl, weight)
    return estimated, exact


def test_its_expectation_is_the_reverse_kl_gradient():
    for temperature in (1.0, 2.0):  # at 2, importance weights q / q_T correct the sampler
        estimated, exact = reverse_kl_gradient_by_sampling(temperature)
        error = (estimated - exact).norm() / exact.norm()
        assert error < 0.03, (temperature, error.item())
    # without the weights, draws at temperature 2 estimate another gradient: the check above can fail
    unweighted, exact = reverse_kl_gradient_by_sampling(2.0, weighted=False)
    assert (unweighted - exact).norm() / exact.norm() > 0.1
