"""Aligning two tokenizations of the same text: every character in exactly one span, on random text
with real tokenizers (Qwen2.5's byte-level BPE, Mistral v0.3's sentencepiece with byte fallback, a
ChatML BPE trained here), and the hard cases by hand."""

import random
from pathlib import Path

import pytest

import kdtune
from kdtune.tokenization.alignment import Retokenizer, align_pieces, align_replies
from kdtune.tokenization.vocab_map import token_bytes

ASSETS = Path(__file__).parents[1] / "assets"
POOL = list("abcxyz ABC0123456789   \n\t.,;!?-'\"") + ["é", "ö", "ß", "€", "中", "文", "😀", "🤖", "  ", "\n\n", "Ġ", "▁"]


@pytest.fixture(scope="module")
def tokenizers_(world):
    return {"qwen2_5": kdtune.load_tokenizer(ASSETS / "qwen2_5_tokenizer"),
            "mistral_v3": kdtune.load_tokenizer(ASSETS / "mistral_v3_tokenizer"),
            "chatml_bpe": kdtune.load_tokenizer(world["tokenizer"])}


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(POOL) for _ in range(rng.randint(1, 60)))


def check_partition(text_len: int, a, b, spans):
    """Spans take every token of each side once, in order, at least one a side; the characters a
    span's tokens cover on one side are the ones its tokens cover on the other, and the spans' ranges
    tile the text."""
    assert spans[0][0] == 0 and spans[0][2] == 0 and spans[-1][1] == len(a) and spans[-1][3] == len(b)
    for (_, i1, _, j1), (i0, _, j0, _) in zip(spans, spans[1:]):
        assert (i1, j1) == (i0, j0)
    covered = 0
    for i0, i1, j0, j1 in spans:
        assert i1 > i0 and j1 > j0
        ra = (min(s for s, _ in a[i0:i1]), max(e for _, e in a[i0:i1]))
        rb = (min(s for s, _ in b[j0:j1]), max(e for _, e in b[j0:j1]))
        if ra[1] > ra[0] and rb[1] > rb[0]:  # (a span of tokens covering no character has no range)
            assert ra == rb and ra[0] == covered, (ra, rb, covered)
            covered = ra[1]
    assert covered == text_len


@pytest.mark.parametrize("pair", [("qwen2_5", "mistral_v3"), ("mistral_v3", "chatml_bpe"), ("qwen2_5", "chatml_bpe")])
def test_every_character_is_in_exactly_one_span(tokenizers_, pair):
    rng = random.Random(0)
    x, y = (tokenizers_[name]._tok for name in pair)
    multi = 0
    for _ in range(300):
        text = random_text(rng)
        a = x.encode(text, add_special_tokens=False).offsets
        b = y.encode(text, add_special_tokens=False).offsets
        spans = align_pieces(a, len(text), b, len(text), len(text))
        check_partition(len(text), a, b, spans)
        multi += any(i1 - i0 > 1 or j1 - j0 > 1 for i0, i1, j0, j1 in spans)
        # the finest such alignment: a span ends at every character both sides have a token end at
        ends_a = {e for (_, e), (s, _) in zip(a, a[1:]) if e <= s}
        ends_b = {e for (_, e), (s, _) in zip(b, b[1:]) if e <= s}
        span_ends = {max(e for _, e in a[i0:i1]) for i0, i1, _, _ in spans}
        assert (ends_a & ends_b) <= span_ends
    assert multi > 100  # the tokenizers do disagree on most texts


def spans_as_text(text_a, a, text_b, b, spans):
    return [(text_a[a[i0][0]:a[i1 - 1][1]], text_b[b[j0][0]:b[j1 - 1][1]]) for i0, i1, j0, j1 in spans]


@pytest.mark.parametrize("text", [
    "12345",  # one digit a token on both sides
    "über 中文 😀",  # multi-byte characters: byte-level pieces vs whole characters or byte fallback
    "  two  spaces\n\nlines",  # 'Ġ'/'▁' prefixes, doubled spaces, newlines as <0x0A> bytes
])
def test_hand_made_cases(tokenizers_, text):
    q, m = tokenizers_["qwen2_5"]._tok, tokenizers_["mistral_v3"]._tok
    a, b = q.encode(text, add_special_tokens=False).offsets, m.encode(text, add_special_tokens=False).offsets
    spans = align_pieces(a, len(text), b, len(text), len(text))
    check_partition(len(text), a, b, spans)
    pieces = spans_as_text(text, a, text, b, spans)
    assert all(x == y for x, y in pieces)
    if text == "12345":  # Mistral's zero-width space prefix '▁' joins the first digit's span
        tokens = [(q.encode(text).tokens[i0:i1], m.encode(text, add_special_tokens=False).tokens[j0:j1])
                  for i0, i1, j0, j1 in spans]
        assert tokens == [(["1"], ["▁", "1"]), (["2"], ["2"]), (["3"], ["3"]), (["4"], ["4"]), (["5"], ["5"])]


def test_byte_fallback_and_split_characters_never_end_a_span(tokenizers_):
    # A character Mistral's vocabulary lacks goes out as its UTF-8 bytes (several tokens on one
    # character); Qwen's byte-level BPE may cut a rare character in two. Neither may end a span there.
    text = "𝔘𝔫𝔦 ꙮ"
    m = tokenizers_["mistral_v3"]._tok.encode(text, add_special_tokens=False)
    q = tokenizers_["qwen2_5"]._tok.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in m.tokens)  # byte fallback happened
    assert len(q.tokens) > len(text)  # some character took several byte-level tokens
    spans = align_pieces(q.offsets, len(text), m.offsets, len(text), len(text))
    check_partition(len(text), q.offsets, m.offsets, spans)


def test_chat_replies_align_across_templates(tokenizers_):
    """Each model renders the conversation in its own template; only the replies are aligned, and
    the two end-of-turn markers (`<|im_end|>` and `</s>`) form the last span of each reply."""
    messages = [{"role": "user", "content": "What is 47 + 38?"}, {"role": "assistant", "content": "47 + 38 = 85"},
                {"role": "user", "content": "And 85 + 1?"}, {"role": "assistant", "content": "Ünïcödé: 86 😀"}]
    sides = []
    for name in ("qwen2_5", "mistral_v3"):
        tok = tokenizers_[name]
        text, spans = tok.render_with_spans(messages)
        sides.append((text, spans, tok._tok.encode(text, add_special_tokens=False)))
    aligned = align_replies(*sides)
    (s_text, _, s_enc), (t_text, _, t_enc) = sides
    for s0, s1, t0, t1 in aligned:
        assert s1 > s0 and t1 > t0
    last_tokens = [(s_enc.tokens[s0:s1], t_enc.tokens[t0:t1]) for s0, s1, t0, t1 in aligned]
    assert last_tokens[-1] == (["<|im_end|>"], ["</s>"])
    # the replies' text, read off the aligned student tokens, is the two replies and their markers
    text = "".join(s_text[s_enc.offsets[s0][0]:s_enc.offsets[s1 - 1][1]] for s0, s1, _, _ in aligned)
    assert text == "47 + 38 = 85<|im_end|>Ünïcödé: 86 😀<|im_end|>"
    # every trained token of each side is in a span (the masks the datasets train on)
    for (full_text, spans, enc), index in ((sides[0], 0), (sides[1], 2)):
        in_spans = sorted(i for span in aligned for i in range(span[index], span[index + 1]))
        trained = [i for i, (s, e) in enumerate(enc.offsets) if any(e > a and s < b for a, b in spans)]
        assert in_spans == trained


@pytest.mark.parametrize("pair", [("mistral_v3", "qwen2_5"), ("qwen2_5", "mistral_v3"), ("chatml_bpe", "mistral_v3")])
def test_a_students_completion_is_rewritten_in_the_teachers_tokens(tokenizers_, pair):
    """On-policy: the student's tokens (here its encoding of random text, cut anywhere, also inside a
    character) written out, encoded by the teacher and aligned: spans take every token once, a side's
    span decodes to the same bytes as the other's, and a completion ending in the student's stop
    token ends with the teacher's end-of-turn token, the two the last span."""
    student, teacher = (tokenizers_[name] for name in pair)
    retokenize = Retokenizer(student, teacher, student.eos_ids)
    s_bytes, t_bytes = token_bytes(student)[0], token_bytes(teacher)[0]
    rng = random.Random(1)
    for n in range(200):  # (a literal '▁' is a space to sentencepiece, in and out: left out here)
        ids = student.encode(random_text(rng).replace("▁", "_"), add_special_tokens=False)
        ids = ids[: rng.randint(1, len(ids))]
        stopped = n % 2 == 0
        completion = ids + [student.eos_id] if stopped else ids
        theirs, spans = retokenize(completion)
        if not theirs:  # the student wrote no character (a bare '▁'): nothing to align, nothing scored
            assert not spans and not b"".join(s_bytes[i] for i in ids).strip()
            continue
        assert spans[0][0] == 0 and spans[-1][1] == len(completion) and spans[0][2] == 0 and spans[-1][3] == len(theirs)
        if stopped:
            assert theirs[-1] == teacher.eos_id and spans[-1][3] - spans[-1][2] == 1  # (a student token of no
            # character before the stop joins it)
        raw = b"".join(s_bytes[i] for i in ids).decode("utf-8", errors="surrogateescape")
        text = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in raw)  # each stray byte: U+FFFD
        assert teacher.decode(theirs[:-1] if stopped else theirs).strip() == text.strip()
        for s0, s1, t0, t1 in spans[:-1] if stopped else spans:
            mine = b"".join(s_bytes[i] for i in completion[s0:s1]).decode("utf-8", errors="surrogateescape")
            mine = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in mine).encode()
            other = b"".join(t_bytes[i] for i in theirs[t0:t1])
            assert mine.strip() == other.strip(), (mine, other)  # (a sentencepiece prefix space aside)


def test_grouped_digits_meet_single_digits(tokenizers_):
    """A vocabulary that writes numbers in groups (as Llama 3's does, up to three digits a token)
    against Qwen2.5's one digit a token: each group's span holds its digits one by one on the other side."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    grouped = Tokenizer(models.BPE())
    grouped.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    numbers = [str(n) for n in range(100, 1000)] * 3 + ["12345 + 678 = 13023"]
    grouped.train_from_iterator(numbers, trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    text = "12345 + 678 = 13023"
    a = grouped.encode(text).offsets
    b = tokenizers_["qwen2_5"]._tok.encode(text, add_special_tokens=False).offsets
    assert len(a) < len(b)  # groups of digits on one side
    spans = align_pieces(a, len(text), b, len(text), len(text))
    check_partition(len(text), a, b, spans)
    assert any(i1 - i0 == 1 and j1 - j0 >= 2 for i0, i1, j0, j1 in spans)  # one group ~ several digits
