"""top-k / top-p filtering against a direct formula, the sampled frequencies, and greedy choice
against torch.argmax."""

import math

import pytest
import torch

from kdtune.generation import filter_logits, first_argmax, sample_next


def kept_by_formula(probs: list[float], top_k=None, top_p=None) -> set[int]:
    """Tokens kept: the k most probable, then (renormalized) those whose more probable tokens hold
    less than top_p."""
    kept = set(range(len(probs)))
    if top_k is not None:
        kept = set(sorted(kept, key=lambda i: -probs[i])[:top_k])
    if top_p is not None:
        total = sum(probs[i] for i in kept)
        kept = {i for i in kept if sum(probs[j] for j in kept if probs[j] > probs[i]) / total < top_p}
    return kept


PROBS = [0.05, 0.4, 0.1, 0.25, 0.2]


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (2, None, {1, 3}),
        (None, 0.6, {1, 3}),  # 0.4 < 0.6 keeps token 3; 0.65 >= 0.6 drops token 4
        (None, 0.7, {1, 3, 4}),
        (None, 0.3, {1}),  # the most probable token always stays
        (3, 0.5, {1, 3}),  # after top-3 the mass before token 4 is 0.65 / 0.85 > 0.5
        (None, 1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_filter_on_a_hand_made_distribution(top_k, top_p, expected):
    logits = torch.tensor([PROBS]).log()
    kept = filter_logits(logits, top_k=top_k, top_p=top_p)[0].isfinite().nonzero().flatten().tolist()
    assert set(kept) == expected == kept_by_formula(PROBS, top_k, top_p)


def test_filter_matches_the_formula_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 30, generator=gen) * 2
    for top_k, top_p in [(5, None), (None, 0.8), (10, 0.9), (None, 0.2)]:
        out = filter_logits(logits, top_k=top_k, top_p=top_p)
        for row, filtered in zip(logits, out):
            probs = row.double().softmax(-1).tolist()
            assert set(filtered.isfinite().nonzero().flatten().tolist()) == kept_by_formula(probs, top_k, top_p)
            assert torch.equal(filtered[filtered.isfinite()], row[filtered.isfinite()])


def test_sampled_frequencies_follow_the_tempered_filtered_distribution():
    logits = torch.tensor(PROBS).log().expand(40000, -1)
    draws = sample_next(logits, temperature=2.0, top_k=4, generator=torch.Generator().manual_seed(0))
    tempered = {i: math.sqrt(PROBS[i]) for i in (1, 2, 3, 4)}  # p^(1/T), top-4 drops token 0
    total = sum(tempered.values())
    counts = torch.bincount(draws, minlength=5).double() / len(draws)
    assert counts[0] == 0
    for i, weight in tempered.items():
        assert abs(counts[i].item() - weight / total) < 0.01


def test_greedy_ignores_the_generator_and_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1)).tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [128 * 37, 1000])  # blocks of 128, and the plain argmax where they don't fit
def test_first_argmax_is_torch_argmax(dtype, vocab):
    """Ties (inside a block and across blocks), NaN (counts as largest, the first one wins), rows of
    -inf, +inf: the same index as torch.argmax on every row, in a contiguous batch and a transposed one."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, vocab, generator=gen).to(dtype)
    logits[1, [5, 300, 4000 % vocab]] = 9.0  # ties across blocks: the first
    logits[2, [130, 131]] = 9.0  # ties inside a block
    logits[3, [700, 200]] = float("nan")
    logits[4] = float("-inf")
    logits[5, [900, 10]] = float("inf")
    logits[6, 64] = float("nan")
    logits[6, 3] = float("inf")
    logits[7] = 0.0  # all equal
    logits[8, -1] = 9.0  # the last column
    logits[9] = logits[9].round()  # many ties
    assert torch.equal(first_argmax(logits), logits.argmax(-1))
    transposed = logits.T.contiguous().T  # vocabulary-major, as the output head's batched forms give them
    assert torch.equal(first_argmax(transposed), logits.argmax(-1))
    assert torch.equal(sample_next(transposed), logits.argmax(-1))
    strided = torch.stack([logits, logits], -1)[..., 0]  # neither layout: torch.argmax itself
    assert torch.equal(first_argmax(strided), logits.argmax(-1))


def test_greedy_choice_matches_torch_argmax_on_a_real_sized_vocabulary():
    logits = torch.randn(8, 151936, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(sample_next(logits), logits.float().argmax(-1))
    assert torch.equal(sample_next(logits.T.contiguous().T), logits.float().argmax(-1))


def test_sampling_from_vocabulary_major_logits_draws_what_row_major_ones_draw():
    logits = torch.randn(4, 1024, generator=torch.Generator().manual_seed(2)).bfloat16()
    draw = lambda x: sample_next(x, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(logits.T.contiguous().T), draw(logits))
