"""Alpaca, chat, text-completion and arithmetic datasets with the real Qwen2.5 tokenizer: tokens are
the chat template's, labels are next-token targets on replies only, bad rows are reported."""

import json
from pathlib import Path

import pytest

from kdtune.datasets import (
    IGNORE_INDEX,
    alpaca_dataset,
    arithmetic_dataset,
    arithmetic_rows,
    chat_dataset,
    text_completion_dataset,
)
from kdtune.errors import KDTuneError
from kdtune.tokenization import load_tokenizer

QWEN = Path(__file__).parents[1] / "assets" / "qwen2_5_tokenizer"
IM_END = 151645


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected_labels(tok, messages):
    """Independent of the dataset code: next token where the mask says the token is trained."""
    ids, mask = tok.tokenize_messages(messages)
    return ids, [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]


def test_alpaca_rows_become_one_turn_chats(tok, tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye."},
    ]
    data = alpaca_dataset(tok, source="jsonl", data_files=str(write_jsonl(tmp_path / "a.jsonl", rows)))
    assert len(data) == 3
    prompts = ["Add the numbers.\n\n2 and 3", "Say hi.", "Say bye."]
    for sample, row, prompt in zip(data, rows, prompts):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        tokens, labels = expected_labels(tok, messages)
        assert sample == {"tokens": tokens, "labels": labels}
        trained = [label for label in sample["labels"] if label != IGNORE_INDEX]
        assert tok.decode(trained) == row["output"] + "<|im_end|>"


def test_alpaca_column_map_csv_and_train_on_input(tok, tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,response\nName a colour.,Red\n")
    data = alpaca_dataset(tok, source="csv", data_files=str(path), column_map={"instruction": "prompt", "output": "response"})
    assert tok.decode([t for t in data[0]["labels"] if t != IGNORE_INDEX]) == "Red<|im_end|>"
    everything = alpaca_dataset(
        tok, source="csv", data_files=str(path), column_map={"instruction": "prompt", "output": "response"}, train_on_input=True
    )[0]
    assert everything["labels"] == everything["tokens"][1:] + [IGNORE_INDEX]


def test_chat_openai_sharegpt_and_auto(tok, tmp_path):
    openai = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                  {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [openai, sharegpt])
    auto = chat_dataset(tok, source="jsonl", data_files=str(path))
    tokens, labels = expected_labels(tok, openai["messages"])
    assert auto[0] == auto[1] == auto[-1] == {"tokens": tokens, "labels": labels}
    with pytest.raises(IndexError):
        auto[2]
    last = chat_dataset(tok, source="jsonl", data_files=str(path), train_on="last", split="train[:1]")
    assert len(last) == 1
    assert tok.decode([t for t in last[0]["labels"] if t != IGNORE_INDEX]) == "Ciao<|im_end|>"
    with pytest.raises(KDTuneError, match="conversation_style"):
        chat_dataset(tok, source="jsonl", data_files=str(path), conversation_style="alpaca")
    with pytest.raises(KDTuneError, match="missing field 'conversations'"):
        chat_dataset(tok, source="jsonl", data_files=str(path), conversation_style="sharegpt")


@pytest.mark.parametrize(
    "row, error",
    [
        ({"messages": []}, "field 'messages' is an empty conversation"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "message 2 of 'messages' has unknown role 'robot'"),
        ({"messages": [{"role": "user"}]}, "message 1 of 'messages': missing field 'content'"),
        ({"text": "hello"}, "missing field 'messages'"),
    ],
)
def test_bad_chat_rows(tok, tmp_path, row, error):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, row, good])
    with pytest.raises(KDTuneError, match=f"c.jsonl line 2: {error}"):
        chat_dataset(tok, source="jsonl", data_files=str(path))
    with pytest.warns(UserWarning, match="skipped 1 bad rows of 3"):
        assert len(chat_dataset(tok, source="jsonl", data_files=str(path), skip_bad_rows=True)) == 2


def test_all_labels_masked_is_an_error(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Only a question"}]}]
    with pytest.raises(KDTuneError, match="every label is masked"):
        chat_dataset(tok, source="jsonl", data_files=str(write_jsonl(tmp_path / "c.jsonl", rows)))
    long = [{"instruction": "word " * 200, "output": "answer"}]
    with pytest.raises(KDTuneError, match="max_seq_len"):
        alpaca_dataset(tok, source="jsonl", data_files=str(write_jsonl(tmp_path / "a.jsonl", long)), max_seq_len=64)


def test_truncation_keeps_the_end_of_turn_token(tok, tmp_path):
    rows = [{"instruction": "Tell a story.", "output": "Once upon a time " * 50}]
    path = str(write_jsonl(tmp_path / "a.jsonl", rows))
    sample = alpaca_dataset(tok, source="jsonl", data_files=path, max_seq_len=64)[0]
    assert len(sample["tokens"]) == 64 and sample["tokens"][-1] == IM_END
    assert sample["labels"][-2] == IM_END and sample["labels"][-1] == IGNORE_INDEX
    assert load_tokenizer(QWEN, max_seq_len=48).max_seq_len == 48
    assert len(alpaca_dataset(load_tokenizer(QWEN, max_seq_len=48), source="jsonl", data_files=path)[0]["tokens"]) == 48


def test_text_completion(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "The cat sat."}, {"body": "  "}, {"body": "Dogs " * 100}])
    with pytest.raises(KDTuneError, match="line 2: field 'text' is empty"):
        text_completion_dataset(tok, source="jsonl", data_files=str(path), column_map={"text": "body"})
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        data = text_completion_dataset(
            tok, source="jsonl", data_files=str(path), column_map={"text": "body"}, max_seq_len=32, skip_bad_rows=True
        )
    tokens = tok.encode("The cat sat.") + [tok.eos_id]
    assert data[0] == {"tokens": tokens, "labels": tokens[1:] + [IGNORE_INDEX]}
    assert len(data[1]["tokens"]) == 32 and data[1]["tokens"][-1] != tok.eos_id  # cut, not ended


def test_arithmetic_is_deterministic_with_disjoint_splits(tok):
    train = arithmetic_rows(300, seed=3)
    assert train == arithmetic_rows(300, seed=3) and train != arithmetic_rows(300, seed=4)
    test = arithmetic_rows(100, split="test", seed=3)
    question = lambda row: row["messages"][0]["content"]  # noqa: E731
    assert not {question(r) for r in train} & {question(r) for r in test}
    for row in train[:50]:
        a, op, b = question(row).removeprefix("What is ").removesuffix("?").split()
        assert row["messages"][1]["content"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    data = arithmetic_dataset(tok, num_rows=4, seed=3)
    assert data[0] == dict(zip(("tokens", "labels"), expected_labels(tok, train[0]["messages"])))
    with pytest.raises(KDTuneError, match="ops"):
        arithmetic_rows(3, ops="/")



def test_chained_problems_write_every_running_result():
    rows = arithmetic_rows(200, seed=5, max_digits=2, ops="+-", terms=4)
    for row in rows:
        words = row["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split()
        total, results = int(words[0]), []
        for op, number in zip(words[1::2], words[2::2]):  # left to right
            total = total + int(number) if op == "+" else total - int(number)
            results.append(str(total))
        assert row["messages"][1]["content"] == ", ".join(results) and len(results) == 3
    # two terms are the plain problems, drawn exactly as before terms existed
    assert arithmetic_rows(50, seed=5, terms=2) == arithmetic_rows(50, seed=5)
    assert arithmetic_rows(1, seed=0, max_digits=2, ops="+")[0]["messages"][1]["content"] == "46"
    with pytest.raises(KDTuneError, match="terms"):
        arithmetic_rows(3, terms=1)

def test_registry_short_names_build_from_a_config(tmp_path):
    from omegaconf import OmegaConf

    from kdtune.config.instantiate import instantiate

    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    cfg = OmegaConf.create(
        {
            "tokenizer": {"_component_": "tokenizer", "path": str(QWEN), "max_seq_len": 64},
            "dataset": {"_component_": "alpaca", "source": "jsonl", "data_files": str(path), "packed": True},
            "prompts": {
                "_component_": "prompts",
                "source": "jsonl",
                "data_files": str(path),
                "column_map": {"prompt": "instruction", "completion": "output"},
            },
            "demo": {"_component_": "arithmetic", "num_rows": 3},
        }
    )
    tok = instantiate(cfg.tokenizer)
    packed = instantiate(cfg.dataset, tokenizer=tok)
    assert len(packed[0]["tokens"]) == 64
    assert instantiate(cfg.prompts, tokenizer=tok)[0]["completion"] == tok.encode("Hello<|im_end|>")
    assert len(instantiate(cfg.demo, tok)) == 3
