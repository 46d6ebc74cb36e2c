"""Aligning two tokenizations of the same text, for distillation between models whose tokenizers
differ.

Both tokenizers encode the same reply (each inside its own model's chat template); each token keeps
the characters it covers. The trained text of a reply is cut only where *both* tokenizations have a
token boundary, so each piece — an aligned span — is covered by one or more whole tokens on each
side: ``"1234"`` as ``12|34`` and ``1|2|3|4`` gives the spans ``12 ~ 1 2`` and ``34 ~ 3 4``. A
character split over several tokens (byte fallback, a multi-byte character cut by byte-level BPE)
never ends a span. The replies' end-of-turn markers differ between templates, so whatever follows
the two texts' common beginning is one last span (``<|im_end|>`` ~ ``<|eot_id|>``).

Every trained token lies in exactly one span on each side, in order; a test checks that property on
random text with real tokenizers.
"""

from kdtune.errors import KDTuneError

Span = tuple[int, int, int, int]  # student tokens [s0, s1) ~ teacher tokens [t0, t1)


def _cuts(offsets: list[tuple[int, int]], length: int) -> list[int]:
    """Character positions after which a token ends and the next begins (never inside a character
    that several tokens share), and the text's end."""
    cuts = [end for (_, end), (start, _) in zip(offsets, offsets[1:]) if end <= start]
    return cuts + [length]


def align_pieces(a: list[tuple[int, int]], a_length: int, b: list[tuple[int, int]], b_length: int,
                 common: int) -> list[Span]:
    """Spans ``(a0, a1, b0, b1)`` of token indices into ``a`` and ``b``, the ``(start, end)`` character
    offsets of two tokenizations of texts of ``a_length`` and ``b_length`` characters whose first
    ``common`` characters are the same. Offsets are clipped to the texts; a token may cover no
    character. Spans cover both token lists whole, in order, each with at least one token a side."""
    if not a or not b:
        return []
    shared = sorted(set(c for c in _cuts(a, a_length) if c <= common) & set(c for c in _cuts(b, b_length) if c <= common))
    if not shared or shared[-1] < max(a_length, b_length):
        shared.append(max(a_length, b_length) + 1)  # what follows the common text: one last span

    def piece_of(offsets):  # the piece each token starts in
        out, k = [], 0
        for start, end in offsets:
            while k < len(shared) - 1 and start >= shared[k] and end > shared[k]:
                k += 1
            out.append(k)
        return out

    pa, pb = piece_of(a), piece_of(b)
    spans, i, j = [], 0, 0
    for k in range(len(shared)):
        i1, j1 = i, j
        while i1 < len(a) and pa[i1] <= k:
            i1 += 1
        while j1 < len(b) and pb[j1] <= k:
            j1 += 1
        if i1 > i and j1 > j:  # else the piece has no token on one side (characters a tokenizer
            spans.append((i, i1, j, j1))  # dropped): it joins the next piece
            i, j = i1, j1
    if i < len(a) or j < len(b):  # nothing followed: the rest joins the last span
        i0, _, j0, _ = spans.pop() if spans else (i, 0, j, 0)
        spans.append((i0, len(a), j0, len(b)))
    return spans


def _common_prefix(x: str, y: str) -> int:
    n = 0
    for cx, cy in zip(x, y):
        if cx != cy:
            break
        n += 1
    return n


def _span_offsets(encoding, start: int, end: int) -> tuple[int, list[tuple[int, int]]]:
    """The first token overlapping characters ``[start, end)`` and the offsets, relative to
    ``start`` and clipped to the span, of every token from it that overlaps them."""
    offsets = encoding.offsets
    first = next((i for i, (s, e) in enumerate(offsets) if e > start and s < end), None)
    if first is None:
        return 0, []
    out = []
    for s, e in offsets[first:]:
        if s >= end and e > s:
            break
        out.append((min(max(s, start), end) - start, min(max(e, start), end) - start))
    return first, out


def align_replies(student: tuple, teacher: tuple) -> list[Span]:
    """Aligned spans, as token indices into each side's whole sequence, of the trained character
    spans of one conversation rendered and encoded by each model: each side is ``(text, spans,
    encoding)`` with ``spans`` from `ChatTemplate.render_with_spans` and ``encoding`` from the
    `tokenizers` library (``offsets``). The k-th trained span of one side is the k-th of the other."""
    (s_text, s_spans, s_enc), (t_text, t_spans, t_enc) = student, teacher
    if len(s_spans) != len(t_spans):
        raise KDTuneError(f"teacher_tokenizer: the teacher's chat template marks {len(t_spans)} replies to train on "
                          f"where the student's marks {len(s_spans)}")
    out = []
    for (s_start, s_end), (t_start, t_end) in zip(s_spans, t_spans):
        s0, a = _span_offsets(s_enc, s_start, s_end)
        t0, b = _span_offsets(t_enc, t_start, t_end)
        common = _common_prefix(s_text[s_start:s_end], t_text[t_start:t_end])
        for i0, i1, j0, j1 in align_pieces(a, s_end - s_start, b, t_end - t_start, common):
            out.append((s0 + i0, s0 + i1, t0 + j0, t0 + j1))
    return out


class Retokenizer:
    """A completion the student wrote (its token ids), written out as text, encoded by the teacher's
    tokenizer and aligned with the student's tokens — on-policy distillation across tokenizers.

    The text is the student tokens' bytes (a sentencepiece vocabulary's ``▁`` prefix on the first
    token dropped, as its decoder does; bytes that are not UTF-8 become U+FFFD for the teacher); a
    token that ends inside a character ends no span. A completion that ends with the student's stop
    token gets the teacher's end-of-turn token in its place, the two forming the last span.
    """

    def __init__(self, student, teacher, stop_ids):
        from kdtune.tokenization.vocab_map import token_bytes

        self.teacher = teacher
        self.pieces = token_bytes(student)[0]
        self.stops = set(stop_ids)
        probe = student.encode("a", add_special_tokens=False)
        self.drop_prefix_space = b"".join(self.pieces[i] or b"" for i in probe) == b" a"

    def __call__(self, completion: list[int]) -> tuple[list[int], list[Span]]:
        """The teacher's ids for ``completion`` and the aligned spans (indices into each completion)."""
        stopped = bool(completion) and completion[-1] in self.stops
        content = completion[:-1] if stopped else completion
        pieces = [self.pieces[i] if i < len(self.pieces) and self.pieces[i] is not None else b"" for i in content]
        if pieces and self.drop_prefix_space and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        data = b"".join(pieces)
        text = data.decode("utf-8", errors="surrogateescape")
        char_of_byte = []  # the character each byte belongs to
        for c, char in enumerate(text):
            char_of_byte += [c] * (1 if "\udc80" <= char <= "\udcff" else len(char.encode()))
        char_of_byte.append(len(text))
        a, at = [], 0
        for piece in pieces:
            start, end = at, at + len(piece)
            a.append((char_of_byte[start], char_of_byte[end - 1] + 1 if end > start else char_of_byte[start]))
            at = end
        clean = "".join("\ufffd" if "\udc80" <= ch <= "\udcff" else ch for ch in text)
        encoding = self.teacher._tok.encode(clean, add_special_tokens=False)
        teacher_ids, b = list(encoding.ids), [tuple(o) for o in encoding.offsets]
        length = len(text)
        if stopped:  # the two end-of-turn tokens, one past the text on each side
            a.append((length, length + 1))
            teacher_ids.append(self.teacher.eos_id)
            b.append((length, length + 1))
        return teacher_ids, align_pieces(a, length + stopped, b, length + stopped, length)
