"""The KD temperature applied to served (temperature-1) top-k rows: the tail's bounds are bounds,
each is exact for the tail it assumes, and the estimate stays near the dense teacher at T = 2 on
real weights (SmolLM2-135M-Instruct, run by kdtune)."""

import pytest
import torch

import kdtune
from kdtune.serving import tail_bounds, temper_topk

V, K = 1000, 20


def top_rows(p: torch.Tensor):
    """Top-k log-probabilities of float64 distributions ``[N, V]``, and the true tempered tails."""
    top = p.log().topk(K, -1)
    return top.values, top.indices


def true_tail(p: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    return p.pow(1 / temperature).scatter(-1, ids, 0.0).sum(-1)


def test_each_bound_is_exact_for_the_tail_it_assumes():
    head = torch.softmax(torch.randn(1, K, dtype=torch.float64) * 0.5, -1) * 0.6  # every p_i above the tail's
    for shape in ("spread", "packed"):
        tail = torch.zeros(1, V - K, dtype=torch.float64)
        if shape == "spread":
            tail += 0.4 / (V - K)
        else:  # as many tokens as possible at the k-th probability, the rest in one
            p_k, left, i = head.min().item(), 0.4, 0
            while left > 1e-15:
                tail[0, i] = min(p_k, left)
                left, i = left - tail[0, i].item(), i + 1
        p = torch.cat([head, tail], -1)
        values, ids = top_rows(p)
        for temperature in (2.0, 0.5):
            packed, spread = tail_bounds(values, temperature, V)
            want = true_tail(p, ids, temperature)
            torch.testing.assert_close((spread if shape == "spread" else packed), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 0.5, 3.0])
def test_the_true_tempered_tail_lies_between_the_bounds(temperature):
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(64, V, dtype=torch.float64) * 3, -1)
    values, ids = top_rows(p)
    packed, spread = tail_bounds(values, temperature, V)
    truth = true_tail(p, ids, temperature)
    low, high = (packed, spread) if temperature > 1 else (spread, packed)
    assert (low <= truth * (1 + 1e-9)).all() and (truth <= high * (1 + 1e-9)).all()


def test_temperature_one_gives_the_rows_back():
    values = torch.randn(8, K).log_softmax(-1).topk(K).values
    assert torch.equal(temper_topk(values, 1.0, V), values)


@pytest.mark.real
def test_on_real_weights_the_estimate_is_near_the_dense_teacher_at_t2(smollm2):
    tok, model = kdtune.load_tokenizer(smollm2), kdtune.load_model(smollm2)
    texts = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
             "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
             "Question: What is the capital of France? Answer: Paris, which is also its largest city."]
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([tok.encode(t)]))[0] for t in texts]).double()
    vocab = tok.vocab_size
    for k in (20, 64):
        top = logits.log_softmax(-1).topk(k, -1)
        truth = (logits / 2).log_softmax(-1).gather(-1, top.indices)  # what a local cache at T = 2 holds
        estimate = temper_topk(top.values.float(), 2.0, vocab).double()
        # as (k + 1)-way distributions (the ids plus the tail bucket), the way every top-k loss reads them
        def buckets(lp):
            return torch.cat([lp.exp(), (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(0)], -1)
        p, q = buckets(truth), buckets(estimate)
        kl = (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1)
        tail_error = (q[:, -1] - p[:, -1]).abs()
        print(f"k={k}: KL mean {kl.mean():.4f} max {kl.max():.4f}; tail mass {p[:, -1].mean():.3f}, "
              f"error mean {tail_error.mean():.3f} max {tail_error.max():.3f}")
        assert kl.mean() < 0.02 and kl.max() < 0.15
        assert tail_error.mean() < 0.08
