"""Teacher and student on one tokenizer distill over its ids; different tokenizers are refused."""

import json

import pytest

from kdtune.checkpointing import check_vocab_compatible
from kdtune.errors import KDTuneError


def _checkpoint(path, pieces, vocab_size):
    """A folder with just what the check reads: config.json's vocab_size and tokenizer.json."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": vocab_size}))
    vocab = {p: i for i, p in enumerate(pieces[:-1])}
    added = [{"id": len(pieces) - 1, "content": pieces[-1], "special": True}]
    tokenizer = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return path


def test_padded_vocabularies_are_cut_to_the_tokenizer(tmp_path):
    student = _checkpoint(tmp_path / "student", ["x", "y", "z", "<eos>"], vocab_size=8)
    teacher = _checkpoint(tmp_path / "teacher", ["x", "y", "z", "<eos>"], vocab_size=16)
    assert check_vocab_compatible(student, teacher, tokenizer_vocab_size=4) == 4


def test_different_tokenizers_are_refused(tmp_path):
    student = _checkpoint(tmp_path / "student", ["x", "y", "z", "<eos>"], vocab_size=8)
    teacher = _checkpoint(tmp_path / "teacher", ["x", "q", "z", "<eos>"], vocab_size=8)
    with pytest.raises(KDTuneError, match=r"token id 1 is 'y' in .*student/tokenizer.json but 'q' in .*teacher/tok"):
        check_vocab_compatible(student, teacher, tokenizer_vocab_size=4)


def test_embedding_smaller_than_the_tokenizer_is_refused(tmp_path):
    student = _checkpoint(tmp_path / "student", ["x", "y", "z", "<eos>"], vocab_size=8)
    teacher = _checkpoint(tmp_path / "teacher", ["x", "y", "z", "<eos>"], vocab_size=3)
    with pytest.raises(KDTuneError, match=r"the teacher \(.*\) has 3 embedding rows but the tokenizer has 4 tokens"):
        check_vocab_compatible(student, teacher, tokenizer_vocab_size=4)


def test_markers_past_a_models_rows_are_not_scored(tmp_path):
    """Gemma 3 1B: its tokenizer's last id (an image placeholder) is past its embedding rows. Special
    markers there are left out of the scored vocabulary; an ordinary token there is still refused."""
    student = _checkpoint(tmp_path / "student", ["x", "y", "z", "<image>"], vocab_size=3)
    teacher = _checkpoint(tmp_path / "teacher", ["x", "y", "z", "<image>"], vocab_size=8)
    assert check_vocab_compatible(student, teacher, tokenizer_vocab_size=4, marker_ids=frozenset({3})) == 3
    with pytest.raises(KDTuneError, match="has 3 embedding rows but the tokenizer has 4 tokens"):
        check_vocab_compatible(student, teacher, tokenizer_vocab_size=4, marker_ids=frozenset({2}))


def test_tables_of_other_sizes_need_both_tokenizers_or_an_explicit_trust(tmp_path):
    """A teacher without tokenizer files and 1,024 more rows: nothing shows that the extra rows are
    padding (a teacher of a larger vocabulary would be distilled on the student's first rows)."""
    student = _checkpoint(tmp_path / "student", ["x", "y", "z", "<eos>"], vocab_size=8)
    teacher = _checkpoint(tmp_path / "teacher", ["x", "y", "z", "<eos>"], vocab_size=8 + 1024)
    (teacher / "tokenizer.json").unlink()
    with pytest.raises(KDTuneError, match=r"^teacher_vocab_check: the teacher \(.*teacher\) has 1,032 embedding rows "
                                          r"and the student's side 8, and .*teacher has no tokenizer.json to show .* put the "
                                          r"teacher's tokenizer files beside its weights, or set teacher_vocab_check: "
                                          r"padding"):
        check_vocab_compatible(student, teacher, tokenizer_vocab_size=4)
    assert check_vocab_compatible(student, teacher, tokenizer_vocab_size=4, vocab_check="padding") == 4
    (student / "tokenizer.json").unlink()  # the student's side missing is the same blind spot
    with pytest.raises(KDTuneError, match="has no tokenizer.json"):
        check_vocab_compatible(student, _checkpoint(tmp_path / "t2", ["x", "y", "z", "<eos>"], vocab_size=16),
                               tokenizer_vocab_size=4)
    # the run's tokenizer elsewhere (tokenizer.path): it is the student's side that counts
    tokenizer_dir = _checkpoint(tmp_path / "tokenizer_only", ["x", "y", "z", "<eos>"], vocab_size=8)
    teacher_with = _checkpoint(tmp_path / "t3", ["x", "y", "z", "<eos>"], vocab_size=16)
    assert check_vocab_compatible(student, teacher_with, tokenizer_vocab_size=4, tokenizer_dir=tokenizer_dir) == 4
    # tables of one size: nothing to pad, nothing to trust
    same = _checkpoint(tmp_path / "same", ["x", "y", "z", "<eos>"], vocab_size=8)
    (same / "tokenizer.json").unlink()
    assert check_vocab_compatible(student, same, tokenizer_vocab_size=4) == 4
