"""Datasets for a teacher of another tokenizer: each sample carries the teacher's own encoding of the
conversation (its template, its tokens) and the aligned spans, computed once when the data loads."""

import json
from pathlib import Path

import pytest

import kdtune
from kdtune.datasets import alpaca_dataset, chat_dataset, collate, write_arithmetic_jsonl
from kdtune.datasets.messages import chat_messages
from kdtune.errors import KDTuneError

ASSETS = Path(__file__).parents[1] / "assets"


@pytest.fixture(scope="module")
def tokenizers_():
    return kdtune.load_tokenizer(ASSETS / "qwen2_5_tokenizer"), kdtune.load_tokenizer(ASSETS / "mistral_v3_tokenizer")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_arithmetic_jsonl(tmp_path_factory.mktemp("aligned") / "chats.jsonl", 12, seed=5, max_digits=3)


def test_samples_carry_the_teachers_encoding_and_spans_over_every_trained_token(tokenizers_, chats):
    student, teacher = tokenizers_
    data = chat_dataset(student, source="jsonl", data_files=str(chats), teacher_tokenizer=teacher)
    plain = chat_dataset(student, source="jsonl", data_files=str(chats))
    rows = chats.read_text().splitlines()
    for i in range(len(data)):
        sample = data[i]
        assert sample["tokens"] == plain[i]["tokens"] and sample["labels"] == plain[i]["labels"]
        messages = chat_messages(json.loads(rows[i]))
        assert sample["teacher_tokens"] == teacher.encode(teacher.render_chat(messages), add_special_tokens=False)
        trained = [p + 1 for p, label in enumerate(sample["labels"]) if label != -100]
        assert sorted(t for s0, s1, _, _ in sample["spans"] for t in range(s0, s1)) == trained
    batch = collate([data[0], data[1]], student.pad_id)
    assert batch["spans"].shape[1] == 5 and set(batch["spans"][:, 0].tolist()) == {0, 1}
    assert batch["teacher_tokens"].shape[0] == 2
    assert data.fingerprint() != plain.fingerprint()


def test_a_cut_sample_keeps_no_span_over_its_replaced_last_token(tokenizers_, tmp_path):
    """Past max_seq_len a sample is cut and its last token becomes the end-of-turn token, which
    no longer stands for the characters of the teacher's tokens: no span covers it."""
    student, teacher = tokenizers_
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Count to twenty.", "input": "",
                                 "output": " ".join(str(i) for i in range(1, 21))}]))
    whole = alpaca_dataset(student, data_files=str(path), teacher_tokenizer=teacher)[0]
    cut = alpaca_dataset(student, data_files=str(path), teacher_tokenizer=teacher,
                         max_seq_len=len(whole["tokens"]) - 5)[0]
    assert cut["tokens"][-1] in student.eos_ids and cut["spans"]
    assert max(s1 for _, s1, _, _ in cut["spans"]) < len(cut["tokens"])  # the replaced token is in no span
    assert cut["spans"] == [s for s in whole["spans"] if s[1] < len(cut["tokens"])]


def test_packing_is_refused(tokenizers_, chats):
    student, teacher = tokenizers_
    with pytest.raises(KDTuneError, match="packed"):
        chat_dataset(student, source="jsonl", data_files=str(chats), teacher_tokenizer=teacher, packed=True,
                     max_seq_len=256)
