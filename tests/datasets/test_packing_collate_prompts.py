"""Packing, collation (padding, block-causal masks) and prompt datasets for on-policy distillation."""

import json
from pathlib import Path

import pytest
import torch

from kdtune.datasets import (
    IGNORE_INDEX,
    arithmetic_dataset,
    collate,
    collate_prompts,
    prompt_completion_sample,
    prompt_dataset,
    text_completion_dataset,
    write_arithmetic_jsonl,
)
from kdtune.errors import KDTuneError
from kdtune.tokenization import load_tokenizer

QWEN = Path(__file__).parents[1] / "assets" / "qwen2_5_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN)


def test_packing_keeps_samples_apart(tok):
    plain = arithmetic_dataset(tok, num_rows=12, seed=1)
    packed = arithmetic_dataset(tok, num_rows=12, seed=1, max_seq_len=100, packed=True)
    assert len(packed) < len(plain)
    assert packed.num_tokens == plain.num_tokens == sum(len(s["tokens"]) for s in plain)
    unpacked = []
    for row in packed:
        assert len(row["tokens"]) == len(row["labels"]) == len(row["input_pos"]) == 100 == sum(row["seq_lens"])
        start = 0
        for n in row["seq_lens"]:
            assert row["input_pos"][start : start + n] == list(range(n))
            unpacked.append({"tokens": row["tokens"][start : start + n], "labels": row["labels"][start : start + n]})
            start += n
    padding = [s for s in unpacked if all(t == tok.pad_id for t in s["tokens"])]
    assert all(all(label == IGNORE_INDEX for label in s["labels"]) for s in padding)
    assert [s for s in unpacked if s not in padding] == list(plain)
    with pytest.raises(KDTuneError, match="packed: true needs max_seq_len"):
        arithmetic_dataset(tok, num_rows=2, packed=True)


def block_causal(seq_lens):
    """Reference mask, entry by entry."""
    owner = [i for i, n in enumerate(seq_lens) for _ in range(n)]
    size = len(owner)
    return torch.tensor([[owner[q] == owner[k] and k <= q for k in range(size)] for q in range(size)])


def test_collate_pads_right_and_builds_block_causal_masks():
    samples = [{"tokens": [5, 6, 7], "labels": [6, 7, -100]}, {"tokens": [8], "labels": [-100]}]
    batch = collate(samples, pad_id=0)
    assert batch.keys() == {"tokens", "labels"}
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.long

    packed = [
        {"tokens": [1, 2, 3, 4, 5], "labels": [2, -100, 4, 5, -100], "input_pos": [0, 1, 0, 1, 2], "seq_lens": [2, 3]},
        {"tokens": [9, 9, 9], "labels": [9, 9, -100], "input_pos": [0, 1, 2], "seq_lens": [3]},
    ]
    batch = collate(packed, pad_id=0, ignore_index=-1)
    assert batch["input_pos"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    assert batch["labels"][1].tolist() == [9, 9, -100, -1, -1]
    assert batch["mask"].shape == (2, 5, 5) and batch["mask"].dtype == torch.bool
    assert torch.equal(batch["mask"][0], block_causal([2, 3]))
    assert torch.equal(batch["mask"][1], block_causal([3, 2]))


def test_prompt_dataset_from_chat_rows(tok, tmp_path):
    path = write_arithmetic_jsonl(tmp_path / "arith.jsonl", 6, split="test", seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    data = prompt_dataset(tok, source="jsonl", data_files=str(path))
    assert len(data) == 6
    for sample, row in zip(data, rows):
        assert sample["prompt"] == tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)
        assert tok.decode(sample["completion"]) == row["messages"][1]["content"] + "<|im_end|>"
        training = prompt_completion_sample(sample["prompt"], sample["completion"])
        ids, mask = tok.tokenize_messages(row["messages"])
        n = len(training["tokens"])
        assert training["tokens"] == ids[:n]  # Qwen writes a newline after <|im_end|>, never trained
        assert training["labels"] == [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(n - 1)] + [IGNORE_INDEX]


def test_prompt_dataset_from_prompt_column(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Why?"}) + "\n" + json.dumps({"question": "word " * 100}) + "\n")
    with pytest.warns(UserWarning, match="dropped 1 prompts longer than 40 tokens"):
        data = prompt_dataset(tok, source="jsonl", data_files=str(path), column_map={"prompt": "question"}, max_prompt_len=40)
    assert len(data) == 1
    assert data[0] == {
        "prompt": tok.apply_chat_template([{"role": "user", "content": "Why?"}], add_generation_prompt=True),
        "completion": [],
    }
    with pytest.raises(KDTuneError, match="no prompts of at most max_prompt_len=5"):
        prompt_dataset(tok, source="jsonl", data_files=str(path), column_map={"prompt": "question"}, max_prompt_len=5)


def test_collate_prompts_pads_left():
    batch = collate_prompts([{"prompt": [1, 2, 3], "completion": [4]}, {"prompt": [5], "completion": []}], pad_id=0)
    assert batch["prompt"].tolist() == [[1, 2, 3], [0, 0, 5]]
    assert batch["prompt_lengths"].tolist() == [3, 1]
    assert batch["completions"] == [[4], []]


def test_packed_text_rows_and_dataloader(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"Document number {i}."}) + "\n" for i in range(9)))
    data = text_completion_dataset(tok, source="jsonl", data_files=str(path), max_seq_len=16, packed=True)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=lambda s: collate(s, tok.pad_id))
    batches = list(loader)
    assert sum(b["tokens"].shape[0] for b in batches) == len(data)
    assert all(b["mask"].shape[1:] == (16, 16) for b in batches)
