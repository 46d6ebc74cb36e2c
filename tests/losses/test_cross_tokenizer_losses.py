"""ULD and the hybrid against float64 references written from the formulas in docs/losses.md, span
by span from whole logits; the vocabulary match on real tokenizers."""

from pathlib import Path

import pytest
import torch

import kdtune
from kdtune.losses import AlignedTeacher, HybridULDLoss, LinearCrossEntropyLoss, ULDLoss
from kdtune.tokenization.vocab_map import matched_tokens, token_bytes

ASSETS = Path(__file__).parents[1] / "assets"
VS, VT, D, DT = 11, 17, 6, 5  # the student's and the teacher's vocabularies (+ 2 padding rows each), widths


def batch(seed=0):
    """Two sequences whose trained tokens are cut into spans of 1-3 tokens a side."""
    g = torch.Generator().manual_seed(seed)
    spans, labels = [], torch.full((2, 12), -100)
    s_tokens = torch.randint(0, VS, (2, 12), generator=g)
    t_tokens = torch.randint(0, VT, (2, 14), generator=g)
    for row, (s, t) in enumerate(((3, 2), (2, 4))):
        while s < 11 and t < 13:
            m, n = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
            m, n = min(m, 11 - s), min(n, 13 - t)
            spans.append([row, s, s + m, t, t + n])
            labels[row, s - 1 : s + m - 1] = s_tokens[row, s : s + m]
            s, t = s + m, t + n
    return dict(hidden=torch.randn(2, 12, D, dtype=torch.float64, generator=g, requires_grad=True),
                weight=torch.randn(VS + 2, D, dtype=torch.float64, generator=g, requires_grad=True),
                teacher=torch.randn(2, 14, DT, dtype=torch.float64, generator=g),
                teacher_weight=torch.randn(VT + 2, DT, dtype=torch.float64, generator=g) * 2,
                t_tokens=t_tokens, labels=labels, spans=torch.tensor(spans))


def span_vector(logits, tokens_next, start, stop, temperature):
    """The span's vector from whole float64 logits: the distribution predicting token ``start``
    times the probabilities of tokens ``start+1 .. stop-1`` (``tokens_next[p]`` is the token at p+1)."""
    p = (logits / temperature).softmax(-1)
    v = p[start - 1].clone()
    for pos in range(start, stop - 1):
        v = v * p[pos, tokens_next[pos]]
    return v


def sorted_l1(a, b):
    width = max(len(a), len(b))
    a = torch.nn.functional.pad(a.sort(descending=True).values, (0, width - len(a)))
    b = torch.nn.functional.pad(b.sort(descending=True).values, (0, width - len(b)))
    return (a - b).abs().sum()


def reference(x, distance, temperature, num_tokens):
    s_logits = x["hidden"] @ x["weight"][:VS].T
    t_logits = x["teacher"] @ x["teacher_weight"][:VT].T
    t_next = torch.nn.functional.pad(x["t_tokens"][:, 1:], (0, 1))
    total = 0
    for row, s0, s1, t0, t1 in x["spans"].tolist():
        vs = span_vector(s_logits[row], x["labels"][row], s0, s1, temperature)
        vt = span_vector(t_logits[row], t_next[row], t0, t1, temperature)
        total = total + (s1 - s0) * distance(vs, vt)
    return total / num_tokens


def hybrid_distance(student_ids, teacher_ids, weight):
    def distance(vs, vt):
        q, p = vs[student_ids], vt[teacher_ids]
        matched = (p * (p / q).log() - p + q).sum()
        rest_s = vs[[i for i in range(VS) if i not in student_ids]]
        rest_t = vt[[i for i in range(VT) if i not in teacher_ids]]
        return weight * matched + (1 - weight) * sorted_l1(rest_s, rest_t)
    return distance


MATCHES = ([0, 3, 4, 9], [5, 0, 16, 2])


@pytest.mark.parametrize("name", ["uld", "hybrid"])
@pytest.mark.parametrize("temperature, chunk_size", [(1.0, 64), (2.0, 3)])
def test_values_and_gradients_match_the_float64_formula(name, temperature, chunk_size):
    x = batch()
    num_tokens = int((x["labels"] != -100).sum()) + 3  # a step's count may exceed this micro-batch's
    if name == "uld":
        loss, distance = ULDLoss(temperature=temperature, chunk_size=chunk_size), sorted_l1
    else:
        loss = HybridULDLoss(temperature=temperature, chunk_size=chunk_size)
        distance = hybrid_distance(*MATCHES, len(MATCHES[1]) / VT)
    loss.set_vocabularies(VS, VT)
    if name == "hybrid":
        loss.set_matches(*MATCHES)
    teacher = AlignedTeacher(x["teacher"], x["t_tokens"], x["spans"])
    ce, kd = loss(x["hidden"], x["weight"], teacher, x["teacher_weight"], x["labels"], kd_ratio=0.5,
                  num_tokens=num_tokens)
    want = reference(x, distance, temperature, num_tokens)
    torch.testing.assert_close(kd, want, rtol=1e-10, atol=0)
    expected_ce = LinearCrossEntropyLoss(form="full")(x["hidden"], x["weight"], x["labels"], num_tokens=num_tokens)
    torch.testing.assert_close(ce, expected_ce, rtol=1e-10, atol=0)
    got = torch.autograd.grad(0.5 * ce + 0.5 * kd, (x["hidden"], x["weight"]))
    expected = torch.autograd.grad(0.5 * expected_ce + 0.5 * want, (x["hidden"], x["weight"]))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_the_hybrid_weight_can_be_set_and_both_parts_count():
    x = batch(1)
    loss = HybridULDLoss(matched_weight=0.25)
    loss.set_vocabularies(VS, VT)
    loss.set_matches(*MATCHES)
    teacher = AlignedTeacher(x["teacher"], x["t_tokens"], x["spans"])
    kd = loss(x["hidden"], x["weight"], teacher, x["teacher_weight"], x["labels"], kd_ratio=1.0, num_tokens=20)[1]
    torch.testing.assert_close(kd, reference(x, hybrid_distance(*MATCHES, 0.25), 1.0, 20), rtol=1e-10, atol=0)


def test_identical_span_vectors_score_zero():
    """A teacher that is the student (same vocabulary, same tokens, every span one token a side)."""
    x = batch(2)
    spans = torch.tensor([[r, p, p + 1, p, p + 1] for r in range(2) for p in range(3, 11)])
    labels = torch.full((2, 12), -100)
    for r, p, _, _, _ in spans.tolist():
        labels[r, p - 1] = 1
    tokens = torch.zeros(2, 12, dtype=torch.long)
    for name, loss in (("uld", ULDLoss()), ("hybrid", HybridULDLoss())):
        loss.set_vocabularies(VS, VS)
        if name == "hybrid":
            loss.set_matches(list(range(VS)), list(range(VS)))
        teacher = AlignedTeacher(x["hidden"].detach(), tokens, spans)
        kd = loss(x["hidden"], x["weight"], teacher, x["weight"].detach(), labels, kd_ratio=1.0, num_tokens=16)[1]
        assert abs(kd.item()) < 1e-12, name


def test_real_vocabularies_match_by_bytes():
    qwen = kdtune.load_tokenizer(ASSETS / "qwen2_5_tokenizer")
    mistral = kdtune.load_tokenizer(ASSETS / "mistral_v3_tokenizer")
    student_ids, teacher_ids = matched_tokens(qwen, mistral)
    assert len(set(student_ids)) == len(student_ids) and len(set(teacher_ids)) == len(teacher_ids)
    pairs = dict(zip(student_ids, teacher_ids))
    q_bytes, q_special, _ = token_bytes(qwen)
    m_bytes, m_special, m_fallback = token_bytes(mistral)
    for i, j in pairs.items():
        if i != qwen.eos_id:
            assert q_bytes[i] == m_bytes[j] and (i in q_special) == (j in m_special)
    assert pairs[qwen.eos_id] == mistral.eos_id  # <|im_end|> ~ </s>: each reply's end
    # 'Ġworld' and '▁world' are the same bytes; a newline is 'Ċ' in one and the byte piece <0x0A> in the other
    assert pairs[qwen._tok.token_to_id("Ġworld")] == mistral._tok.token_to_id("▁world")
    assert pairs[qwen._tok.token_to_id("Ċ")] == mistral._tok.token_to_id("<0x0A>")
    # a letter Mistral has both as a piece and as a byte piece matches the piece
    assert pairs[qwen._tok.token_to_id("A")] == mistral._tok.token_to_id("A") not in m_fallback
    assert 25_000 < len(pairs) < mistral.vocab_size


def topk_teacher(x, k):
    """The teacher's top-k rows (float64 log-probabilities, decreasing) and each position's
    log-probability of the teacher token after it, as a served teacher gives them."""
    from kdtune.losses import TeacherTopK

    log_p = (x["teacher"] @ x["teacher_weight"][:VT].T).log_softmax(-1)
    top = log_p.topk(k)
    after = torch.nn.functional.pad(x["t_tokens"][:, 1:], (0, 1))
    return TeacherTopK(top.values, top.indices), log_p.gather(-1, after[..., None])[..., 0]


@pytest.mark.parametrize("name", ["uld", "hybrid"])
def test_a_top_k_teacher_with_every_token_is_the_dense_teacher(name):
    """With k the whole vocabulary the top-k path gives the dense loss and gradients; with k = 4
    ULD is a lower bound of the dense distance (the tail compared as one sum)."""
    x = batch(3)
    loss = ULDLoss() if name == "uld" else HybridULDLoss()
    loss.set_vocabularies(VS, VT)
    if name == "hybrid":
        loss.set_matches(*MATCHES)
    dense = AlignedTeacher(x["teacher"], x["t_tokens"], x["spans"])
    args = (x["hidden"], x["weight"])
    _, want = loss(*args, dense, x["teacher_weight"], x["labels"], kd_ratio=1.0, num_tokens=20)
    rows, own = topk_teacher(x, VT)
    _, got = loss(*args, AlignedTeacher(rows, None, x["spans"], own), None, x["labels"], kd_ratio=1.0, num_tokens=20)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, e in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    rows, own = topk_teacher(x, 4)
    _, small = loss(*args, AlignedTeacher(rows, None, x["spans"], own), None, x["labels"], kd_ratio=1.0, num_tokens=20)
    assert torch.isfinite(small) and small > 0
    if name == "uld":
        assert small <= want + 1e-12
