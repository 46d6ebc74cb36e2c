"""The distillation loss from a cached top-k teacher: equal to the online teacher's when k covers
the vocabulary, in every loss form, gradients included; a lower bound below that."""

import pytest
import torch

from kdtune.datasets import collate
from kdtune.losses import ForwardKLLoss, GeneralizedJSDLoss, LinearKDLoss
from kdtune.models import TransformerDecoder
from kdtune.models.args import ModelArgs
from kdtune.offline import collate_with_teacher_topk, teacher_topk

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


def step(loss_fn, student, teacher, batch, kd_ratio):
    """One micro-batch as the KD recipe takes it: (loss, ce, kd) and the student's gradients."""
    student.zero_grad()
    n = int((batch["labels"] != -100).sum())
    hidden = student(batch["tokens"], return_hidden=True)
    if teacher is None:
        teacher_out, teacher_weight = batch["teacher_topk"], None
    else:
        with torch.no_grad():
            teacher_out, teacher_weight = teacher(batch["tokens"], return_hidden=True), teacher.output_weight
    ce, kd = loss_fn(hidden, student.output_weight, teacher_out, teacher_weight, batch["labels"], kd_ratio=kd_ratio,
                     num_tokens=n)
    loss = (1 - kd_ratio) * ce + kd_ratio * kd
    loss.backward()
    return [t.detach() for t in (loss, ce, kd)], [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("form", ["fused", "chunked", "full"])
@pytest.mark.parametrize("loss", [ForwardKLLoss(temperature=2.0), GeneralizedJSDLoss(beta=0.3)], ids=["kl_t2", "jsd"])
def test_k_equal_to_the_vocabulary_reproduces_the_online_teacher(form, loss):
    student, teacher = model(2, 0), model(3, 1).requires_grad_(False).eval()
    batch = cached(teacher, samples(), k=VOCAB, temperature=loss.temperature)
    loss.vocab_size = VOCAB
    loss_fn = LinearKDLoss(loss, form=form, chunk_size=5, num_chunks=3)
    plain = {k: v for k, v in batch.items() if k != "teacher_topk"}
    want, want_grads = step(loss_fn, student, teacher, plain, 0.5)
    got, got_grads = step(loss_fn, student, None, batch, 0.5)
    assert want[2] > 0.01
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_fewer_ids_give_a_lower_bound_that_tightens_with_k():
    student, teacher = model(2, 0), model(3, 1).requires_grad_(False).eval()
    loss_fn = LinearKDLoss(ForwardKLLoss(vocab_size=VOCAB))
    dense = step(loss_fn, student, teacher, collate(samples(), pad_id=0), 1.0)[0][2].item()
    kd = [step(loss_fn, student, None, cached(teacher, samples(), k, 1.0), 1.0)[0][2].item() for k in (4, 16, 64, VOCAB)]
    assert kd == sorted(kd) and kd[-1] == pytest.approx(dense, rel=1e-5)
    assert kd[0] < dense
