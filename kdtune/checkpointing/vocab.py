"""Teacher and student must share a tokenizer; their embedding tables may differ by padding.

Qwen2.5-14B pads its vocabulary to 152,064 rows, Qwen2.5-0.5B to 151,936, for the same 151,665
tokens. Distillation compares the two distributions over the tokenizer's ids only, so both output
projections are cut to ``tokenizer_vocab_size`` rows (``model.output_weight[:n]``; the rows beyond
are padding no token id reaches).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdtune.checkpointing.hf_format import read_config, text_config
from kdtune.errors import KDTuneError


def _token_table(checkpoint_dir: Path) -> dict[int, str] | None:
    """id -> token of the checkpoint's ``tokenizer.json`` (vocabulary plus added tokens), or None."""
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    table = {i: piece for piece, i in vocab.items()} if isinstance(vocab, dict) else {
        i: entry[0] for i, entry in enumerate(vocab)  # Unigram: a list of [piece, score]
    }
    table.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return table


VOCAB_CHECKS = ("tokenizer", "padding")  # teacher_vocab_check: compare the tokenizers, or trust the padding


def check_vocab_compatible(student_dir: str | Path, teacher_dir: str | Path, tokenizer_vocab_size: int,
                           marker_ids: frozenset[int] = frozenset(), vocab_check: str = "tokenizer",
                           tokenizer_dir: str | Path | None = None) -> int:
    """Return the number of output rows both checkpoints' models are scored on, checked before
    training starts: ``tokenizer_vocab_size``, or fewer when the tokenizer's last ids are markers
    (``Tokenizer.marker_ids``: special, not BOS/EOS/padding) a model has no rows for. Gemma 3 1B's
    tokenizer ends with ``<image_soft_token>`` at id 262,144, one past its 262,144 rows; text never
    holds such tokens, so no label or prediction is lost.

    Raises a KDTuneError when a model lacks rows for an ordinary token id (it cannot be that model's
    tokenizer), when both checkpoints ship a ``tokenizer.json`` and they map some scored id to
    different tokens, or (see `require_comparable`) when the embedding tables differ in size and a
    ``tokenizer.json`` is missing (the run's, in ``tokenizer_dir``, or the teacher's), unless
    ``vocab_check`` is ``padding``.
    """
    scored, rows = tokenizer_vocab_size, []
    for who, folder in (("student", student_dir), ("teacher", teacher_dir)):
        size = text_config(read_config(Path(folder)))["vocab_size"]
        if scored_vocab_size(size, tokenizer_vocab_size, marker_ids) is None:
            raise KDTuneError(
                f"the {who} ({folder}) has {size} embedding rows but the tokenizer has {tokenizer_vocab_size} "
                "tokens: teacher and student must use the same tokenizer"
            )
        scored, rows = min(scored, size), rows + [size]
    if rows[0] != rows[1]:
        require_comparable(tokenizer_dir or student_dir, teacher_dir, rows[0], rows[1], vocab_check)
    check_same_tokens(student_dir, teacher_dir, scored)
    return scored


def require_comparable(student_side: str | Path, teacher_dir: str | Path, student_rows: int, teacher_rows: int,
                       vocab_check: str) -> None:
    """Tables of different sizes are the same tokenizer padded differently only if the tokenizers say
    so: with a ``tokenizer.json`` missing on either side nothing shows that the extra rows are padding
    (a teacher of another, larger vocabulary would be distilled on the student's first rows), so it is
    refused unless ``teacher_vocab_check: padding`` trusts it."""
    if vocab_check == "padding":
        return
    missing = [d for d in (student_side, teacher_dir) if _token_table(Path(d)) is None]
    if missing:
        fix = "put the teacher's tokenizer files beside its weights" if missing[0] == teacher_dir else \
            "point tokenizer.path at a folder with the student's tokenizer.json"
        raise KDTuneError(
            f"teacher_vocab_check: the teacher ({teacher_dir}) has {teacher_rows:,} embedding rows and the student's "
            f"side {student_rows:,}, and {missing[0]} has no tokenizer.json to show that the extra rows are padding; "
            f"{fix}, or set teacher_vocab_check: padding to trust that rows past "
            f"{min(student_rows, teacher_rows):,} are padding of the same tokenizer")


def scored_vocab_size(rows: int, tokenizer_vocab_size: int, marker_ids: frozenset[int]) -> int | None:
    """The tokenizer's ids a model with ``rows`` output rows is scored and sampled on: all of them,
    those below ``rows`` when only markers lie past it, or None when an ordinary token has no row."""
    if rows >= tokenizer_vocab_size:
        return tokenizer_vocab_size
    return rows if set(range(rows, tokenizer_vocab_size)) <= marker_ids else None


def check_same_tokens(first_dir: str | Path, second_dir: str | Path, vocab_size: int) -> None:
    """When both folders ship a ``tokenizer.json``, they map every id below ``vocab_size`` to the
    same token (a KDTuneError names the first id that differs)."""
    first, second = _token_table(Path(first_dir)), _token_table(Path(second_dir))
    if first is None or second is None:
        return
    for i in range(vocab_size):
        if first.get(i) != second.get(i):
            raise KDTuneError(
                f"different tokenizers: token id {i} is {first.get(i)!r} in {first_dir}/tokenizer.json "
                f"but {second.get(i)!r} in {second_dir}/tokenizer.json"
            )
