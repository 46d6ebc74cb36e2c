"""Which tokens two vocabularies share, compared by the bytes they stand for.

Tokenizers spell the same bytes differently: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) writes
each byte as a printable character (a space is ``Ġ``), sentencepiece-style vocabularies (Llama 2,
Mistral, Gemma) write a space as ``▁`` and an uncovered byte as ``<0xNN>``. Each token is turned into
its bytes first; tokens of equal bytes are matched, special tokens only to special tokens of the same
text, and the two end-of-turn tokens to each other (a reply ends with one on each side).
"""

import json

from kdtune.checkpointing.spm import is_byte_piece


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte value: printable Latin-1 bytes
    stand for themselves, the others are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shift)] = byte
            shift += 1
    return chars


def _decoder_types(spec: dict | None) -> set[str]:
    if not spec:
        return set()
    if spec.get("type") == "Sequence":
        return {t for d in spec.get("decoders", []) for t in _decoder_types(d)}
    return {spec.get("type")}


def token_bytes(tokenizer) -> tuple[list[bytes | None], set[int], set[int]]:
    """Each id's bytes (None for an id the vocabulary lacks), the special ids (whose bytes are their
    text) and the byte-fallback ids (``<0xNN>``)."""
    spec = json.loads(tokenizer._tok.to_str())
    decoders = _decoder_types(spec.get("decoder"))
    byte_level = "ByteLevel" in decoders
    alphabet = _byte_level_alphabet()
    vocab = tokenizer._tok.get_vocab(with_added_tokens=True)
    added = tokenizer._tok.get_added_tokens_decoder()
    special = {i for i, token in added.items() if token.special}
    out: list[bytes | None] = [None] * tokenizer.vocab_size
    fallback = set()
    for piece, i in vocab.items():
        if i >= len(out):
            continue
        if i in added:
            out[i] = added[i].content.encode()
        elif byte_level:
            out[i] = bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
        elif is_byte_piece(piece):
            out[i] = bytes([int(piece[3:5], 16)])
            fallback.add(i)
        else:
            out[i] = piece.replace("▁", " ").encode()
    return out, special, fallback


def matched_tokens(student, teacher) -> tuple[list[int], list[int]]:
    """Pairs of ids, one list per side, of the tokens both vocabularies share (each id in one pair
    at most): equal bytes, special tokens by their text, and the two end-of-turn tokens."""
    pairs = {student.eos_id: teacher.eos_id} if student.eos_id is not None and teacher.eos_id is not None else {}
    s_bytes, s_special, s_fallback = token_bytes(student)
    t_bytes, t_special, t_fallback = token_bytes(teacher)

    def preferred(ids, fallback):  # a byte piece ``<0x41>`` after the piece ``A`` of the same byte
        return sorted(ids, key=lambda i: (i in fallback, i))

    by_bytes: dict[tuple[bool, bytes], int] = {}
    for i in preferred(range(len(t_bytes)), t_fallback):
        if t_bytes[i] is not None:
            by_bytes.setdefault((i in t_special, t_bytes[i]), i)
    taken = set(pairs.values())
    for i in preferred(range(len(s_bytes)), s_fallback):
        b = s_bytes[i]
        j = None if b is None or i in pairs else by_bytes.get((i in s_special, b))
        if j is not None and j not in taken:
            pairs[i] = j
            taken.add(j)
    ids = sorted(pairs)
    return ids, [pairs[i] for i in ids]
