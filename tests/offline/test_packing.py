"""The q8 cache storage: ids at the vocabulary's bit width, log-probabilities as 8-bit codes under
each row's top value, held to its error bound, its size, and the loss it gives against exact rows."""

import math

import pytest
import torch

from kdtune.losses import ForwardKLLoss, GeneralizedJSDLoss, TeacherTopK
from kdtune.offline.packing import bytes_per_row, dequantize, id_bits, pack_ids, quantize, unpack_ids
from kdtune.offline.shards import encode_rows


@pytest.mark.parametrize("vocab, bits", [(2, 1), (49_152, 16), (131_072, 17), (131_073, 18), (151_936, 18)])
def test_ids_round_trip_at_the_vocabularys_bit_width(vocab, bits):
    assert id_bits(vocab) == bits
    g = torch.Generator().manual_seed(vocab)
    ids = torch.cat([torch.tensor([0, vocab - 1]), torch.randint(0, vocab, (126,), generator=g)]).view(2, 64)
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, math.ceil(64 * bits / 8))
    assert torch.equal(unpack_ids(packed, 64, bits), ids)


def teacher_rows(kind: str, n=256, vocab=4096, k=64, seed=0):
    """Sorted top-k log-probabilities of teachers from nearly flat to very peaked."""
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("zipf"):  # a language model's rank-frequency shape, with noise
        alpha = float(kind[4:])
        ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
        logits = -alpha * ranks.log() + 0.5 * torch.randn(n, vocab, generator=g)
        logits = logits[:, torch.randperm(vocab, generator=g)]
    else:
        logits = float(kind[5:]) * torch.randn(n, vocab, generator=g)
    return logits, logits.log_softmax(-1).topk(k, dim=-1)


@pytest.mark.parametrize("kind", ["scale0.1", "scale1", "scale5", "scale30", "zipf1", "zipf2"])
def test_each_log_probability_is_within_its_bound_and_the_mass_is_kept(kind):
    _, top = teacher_rows(kind)
    exact = top.values.clone()
    exact[0, 50:] = float("-inf")  # fewer finite entries than k
    exact[1, :] = exact[1, 0]  # a flat row: span 0
    mass, span, codes = quantize(exact)
    back = dequantize(mass, span, codes, exact.shape[1])
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(back), finite)
    bound = (span[:, None] / 127).expand_as(exact)
    assert ((back - exact).abs()[finite] <= bound[finite] + 1e-5 * (1 + exact.abs()[finite])).all()
    torch.testing.assert_close(back.logsumexp(1), exact.logsumexp(1), rtol=0, atol=2e-6)
    torch.testing.assert_close(back[1], exact[1], rtol=0, atol=2e-6)
    assert codes.shape == (len(exact), math.ceil((64 + 255) / 8))


def test_unsorted_rows_are_refused():
    with pytest.raises(ValueError, match="sorted in decreasing order"):
        quantize(torch.tensor([[-3.0, -1.0, -2.0]]))


def test_a_token_costs_under_200_bytes_at_k_64():
    _, top = teacher_rows("zipf1", n=8, vocab=151_936)
    stored = encode_rows(top.values, top.indices, "q8", 151_936)
    per_token = sum(t[0].numel() * t.element_size() for t in stored.values())
    assert per_token == bytes_per_row(64, 151_936) == 192
    fp16 = encode_rows(top.values, top.indices, "fp16", 151_936)
    assert sum(t[0].numel() * t.element_size() for t in fp16.values()) == 320


@pytest.mark.parametrize("kind", ["scale1", "scale5", "scale30", "zipf1", "zipf1.5", "zipf2"])
@pytest.mark.parametrize("student", ["untrained", "close", "closer"])
@pytest.mark.parametrize("divergence", [ForwardKLLoss(), GeneralizedJSDLoss(beta=0.5)], ids=["forward_kl", "jsd"])
def test_the_loss_from_q8_rows_is_within_1_percent_of_exact_top_64(kind, student, divergence):
    """Against float32 rows; rounding each value alone (no kept mass) fails this by up to 60x on
    peaked teachers with close students: the tail bucket 1 - sum(p) is a difference of near-equal numbers."""
    logits, top = teacher_rows(kind)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(logits.shape, generator=g)
    # A student far from the teacher, and two near it (small losses, where errors show most).
    student_logits = noise if student == "untrained" else logits + {"close": 0.3, "closer": 0.1}[student] * noise
    mass, span, codes = quantize(top.values)
    stored = dequantize(mass, span, codes, top.values.shape[1])
    exact_loss = divergence.token_values(student_logits, TeacherTopK(top.values, top.indices)).mean()
    q8_loss = divergence.token_values(student_logits, TeacherTopK(stored, top.indices)).mean()
    assert float(exact_loss) > 0
    assert abs(float(q8_loss) - float(exact_loss)) <= 0.01 * float(exact_loss), (float(q8_loss), float(exact_loss))
