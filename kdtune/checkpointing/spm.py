"""Sentencepiece-style vocabularies (Llama 2, Mistral, Phi-3-mini, Gemma) as llama.cpp stores them
(``tokenizer.ggml.model: llama``) and as Hugging Face's ``tokenizer.json`` holds them.

llama.cpp keeps each piece with a score and a type and tokenizes as sentencepiece's BPE does:
spaces become ``▁`` (and one is put in front of the text when ``add_space_prefix``), then the
adjacent pair whose concatenation is the highest-scoring piece is merged, again and again; text no
piece covers falls back to its UTF-8 bytes, the ``<0xNN>`` pieces. ``tokenizer.json`` holds the same
vocabulary as a BPE model with ``byte_fallback`` and a ranked merge list, in which every pair of
pieces that concatenates to a piece is a merge, ranked by that piece's score. The two conversions
here are each other's inverse: a piece's score is minus the rank of the first merge that makes it.
"""

import json

BYTE_PIECE = "<0x{:02X}>"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
SPACE = "\u2581"


def is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def pieces_of(spec: dict) -> tuple[list[str], list[float], list[int]]:
    """Pieces by id, their scores (minus the rank of the first merge making each; 0 for the rest)
    and llama.cpp types, from a ``tokenizer.json`` BPE model with byte fallback."""
    model = spec["model"]
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    pieces = [""] * (max(ids.values()) + 1)
    for piece, i in ids.items():
        pieces[i] = piece
    scores = [0.0] * len(pieces)
    made = set()
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece = left + right
        if piece in ids and piece not in made:
            made.add(piece)
            scores[ids[piece]] = -float(rank)
    types = [BYTE if is_byte_piece(p) else NORMAL for p in pieces]
    if model.get("unk_token") in ids:
        types[ids[model["unk_token"]]] = UNKNOWN
    for added in spec.get("added_tokens", []):
        if added["content"] != model.get("unk_token"):
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    return pieces, scores, types


def tokenizer_json(pieces: list[str], scores: list[float], types: list[int], *, add_space_prefix: bool,
                   unk_id: int | None, bos_id: int | None, eos_id: int | None, add_bos: bool,
                   add_eos: bool) -> dict:
    """The ``tokenizer.json`` of a llama.cpp ``llama`` vocabulary (`pieces_of` undone)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {i for i, t in enumerate(types) if t in (NORMAL, USER_DEFINED)}
    candidates = []  # (score of the piece made, left id, right id)
    for i in mergeable:
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left in mergeable and right in mergeable:
                candidates.append((-scores[i], i, left, right))
    candidates.sort()
    merges = [(pieces[left], pieces[right]) for _, _, left, right in candidates]
    unk = pieces[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # as sentencepiece: the space prefix in front of every text (even one that starts with a space)
    escape = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if add_space_prefix else escape
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    specials = [(pieces[i], i) for i, on in ((bos_id, add_bos), (eos_id, add_eos)) if on and i is not None]
    single = " ".join([*([specials[0][0]] if add_bos and bos_id is not None else []), "$A",
                       *([pieces[eos_id]] if add_eos and eos_id is not None else [])])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} {single.replace('$A', '$B')}",
                                                       special_tokens=specials)
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(pieces[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    return json.loads(tok.to_str())


def adds_space_prefix(tokenizer) -> bool:
    """Whether ``tokenizer`` puts a ``▁`` in front of the text (Llama 2, Mistral) or not (Gemma)."""
    first = tokenizer.encode("a", add_special_tokens=False).tokens[:1]
    return bool(first) and first[0].startswith(SPACE)
