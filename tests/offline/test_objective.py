"""The distillation objective from a cached top-k teacher: equal to the online teacher's when k
covers the vocabulary, in every loss form, gradients included; a lower bound below that."""

import pytest
import torch

from kdtune.datasets import collate
from kdtune.losses import ForwardKLLoss, GeneralizedJSDLoss
from kdtune.models import TransformerDecoder
from kdtune.models.args import ModelArgs
from kdtune.offline import collate_with_teacher_topk, teacher_topk
from kdtune.training import DistillationObjective

VOCAB, PADDED = 300, 320  # tokenizer ids; embedding rows (padding rows must never count)


def model(layers: int, seed: int) -> TransformerDecoder:
    torch.manual_seed(seed)
    args = ModelArgs(model_type="qwen2", vocab_size=PADDED, hidden_size=32, intermediate_size=64, num_layers=layers,
                     num_heads=4, num_kv_heads=2, head_dim=8, norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True)
    net = TransformerDecoder(args)
    for p in net.parameters():  # larger weights: peaked distributions, as a trained teacher's
        p.data.normal_(0, 0.3 if layers > 2 else 0.05)
    return net


def samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (11, 7, 9):
        tokens = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [-100] * 3 + tokens[4:] + [-100]  # a prompt of 4 tokens, then trained
        out.append({"tokens": tokens, "labels": labels})
    return out


def cached(teacher, batch_samples, k, temperature):
    """The samples with their rows as the cache writer computes them (float32, one sample at a time)."""
    weight = teacher.output_weight[:VOCAB]
    for s in batch_samples:
        batch = {"tokens": torch.tensor([s["tokens"]]), "labels": torch.tensor([s["labels"]])}
        s["teacher_logprobs"], s["teacher_ids"] = teacher_topk(teacher, batch, weight, k, temperature)
    return collate_with_teacher_topk(batch_samples, pad_id=0)


def step(objective, student, batch):
    student.zero_grad()
    n = int((batch["labels"] != -100).sum())
    out = objective(batch, n)
    out.loss.backward()
    return out, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("form", ["fused", "chunked", "full"])
@pytest.mark.parametrize("loss", [ForwardKLLoss(temperature=2.0), GeneralizedJSDLoss(beta=0.3)], ids=["kl_t2", "jsd"])
def test_k_equal_to_the_vocabulary_reproduces_the_online_teacher(form, loss):
    student, teacher = model(2, 0), model(3, 1).requires_grad_(False).eval()
    batch = cached(teacher, samples(), k=VOCAB, temperature=loss.temperature)
    loss.vocab_size = VOCAB
    online = DistillationObjective(student, teacher, loss, kd_ratio=0.5, form=form, chunk_size=5, num_output_chunks=3)
    offline = DistillationObjective(student, None, loss, kd_ratio=0.5, form=form, chunk_size=5, num_output_chunks=3)
    plain = {k: v for k, v in batch.items() if k != "teacher_topk"}
    want, want_grads = step(online, student, plain)
    got, got_grads = step(offline, student, batch)
    assert want.parts["kd_loss"] > 0.01
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    assert got.parts == pytest.approx(want.parts, abs=1e-6, rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_fewer_ids_give_a_lower_bound_that_tightens_with_k():
    student, teacher = model(2, 0), model(3, 1).requires_grad_(False).eval()
    loss = ForwardKLLoss(vocab_size=VOCAB)
    online = DistillationObjective(student, teacher, loss, kd_ratio=1.0)
    offline = DistillationObjective(student, None, loss, kd_ratio=1.0)
    dense = step(online, student, collate(samples(), pad_id=0))[0].parts["kd_loss"]
    kd = [step(offline, student, cached(teacher, samples(), k, 1.0))[0].parts["kd_loss"] for k in (4, 16, 64, VOCAB)]
    assert kd == sorted(kd) and kd[-1] == pytest.approx(dense, rel=1e-5)
    assert kd[0] < dense
