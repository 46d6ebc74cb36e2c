"""How a teacher cache stores rows: ids in as few bytes as the vocabulary needs, float16
log-probabilities rounded toward -inf, and the collate that puts rows back at their positions."""

import pytest
import torch

from kdtune.datasets import collate
from kdtune.offline import collate_with_teacher_topk, decode_ids, encode_ids, id_bytes, store_logprobs


@pytest.mark.parametrize("vocab, nbytes", [(256, 1), (300, 2), (65_536, 2), (65_537, 3), (128_256, 3), (151_936, 3)])
def test_ids_round_trip_in_the_fewest_bytes(vocab, nbytes):
    assert id_bytes(vocab) == nbytes
    ids = torch.cat([torch.tensor([0, vocab - 1]), torch.randint(0, vocab, (62,))]).view(2, 32)
    raw = encode_ids(ids, nbytes)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 32, nbytes)
    assert torch.equal(decode_ids(raw), ids)


def test_float16_log_probabilities_round_down_by_at_most_one_step():
    logits = torch.randn(64, 300) * 6
    exact = logits.log_softmax(-1).topk(64, dim=-1).values
    exact[0, -1] = float("-inf")
    exact[1, -1] = -1e5  # below float16's range: probability 0 either way
    stored = store_logprobs(exact, torch.float16)
    assert stored.dtype == torch.float16
    assert (stored.float() <= exact).all()
    step_up = torch.nextafter(stored, torch.zeros_like(stored)).float()
    finite = torch.isfinite(stored)
    assert (step_up[finite] >= exact[finite]).all()  # the nearest value below, never further
    assert stored[0, -1] == float("-inf") and stored[1, -1] == float("-inf")
    # So a row's stored probabilities never sum to more than the exact ones: the tail stays >= 0.
    assert (stored.float().exp().sum(-1) <= exact.exp().sum(-1)).all()
    assert torch.equal(store_logprobs(exact, torch.float32), exact)


def test_collate_places_each_samples_rows_at_its_trained_positions():
    samples = [{"tokens": [5, 6, 7, 8], "labels": [-100, 7, 8, -100]}, {"tokens": [9, 10], "labels": [10, -100]}]
    k = 3
    for i, s in enumerate(samples):
        n = sum(label != -100 for label in s["labels"])
        s["teacher_logprobs"] = -torch.arange(n * k, dtype=torch.float16).view(n, k) - 10 * i
        s["teacher_ids"] = torch.arange(n * k).view(n, k) + 100 * i
    batch = collate_with_teacher_topk(samples, pad_id=0)
    plain = collate(samples, pad_id=0)
    assert all(torch.equal(batch[key], plain[key]) for key in plain)
    topk = batch["teacher_topk"]
    assert topk.logprobs.shape == topk.ids.shape == (2, 4, k)
    assert torch.equal(topk.ids[0, 1], samples[0]["teacher_ids"][0])
    assert torch.equal(topk.ids[0, 2], samples[0]["teacher_ids"][1])
    assert torch.equal(topk.logprobs[1, 0], samples[1]["teacher_logprobs"][0])
    untrained = batch["labels"] == -100
    assert (topk.ids[untrained] == 0).all() and (topk.logprobs[untrained] == 0).all()
