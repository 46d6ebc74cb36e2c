"""A synthetic task for the demo and tests: multi-digit arithmetic as one-turn chats.

Rows are deterministic in their arguments. The ``train`` and ``test`` splits never share a
problem: a problem is held out when a hash of it and the seed falls in one bucket of ten.

With ``terms`` above 2 a problem chains several operations, evaluated left to right, and the answer
writes every running result ("What is 47 + 38 + 21?" -> "85, 106"): each result builds on the one
written before it, so one wrong digit early spoils everything after it.
"""

import json
import operator
from pathlib import Path
import random
import zlib

from kdtune.config.checks import argument_checks, boolean, choice, integer
from kdtune.datasets.messages import chat_messages
from kdtune.datasets.rows import Row
from kdtune.datasets.sft import SFTDataset, chat_sft_dataset
from kdtune.errors import KDTuneError

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_rows(
    num_rows: int, *, split: str = "train", seed: int = 0, max_digits: int = 3, ops: str = "+-", terms: int = 2
) -> list[dict]:
    """``num_rows`` OpenAI-style rows: "What is 407 + 38?" answered "445" (``terms`` numbers per
    problem; with more than 2 the answer lists the running results)."""
    if split not in ("train", "test"):
        raise KDTuneError(f"split: expected 'train' or 'test', got {split!r}")
    if not ops or set(ops) - set(OPERATIONS):
        raise KDTuneError(f"ops: expected some of {''.join(OPERATIONS)!r}, got {ops!r}")
    if max_digits < 1:
        raise KDTuneError(f"max_digits: expected at least 1, got {max_digits}")
    if terms < 2:
        raise KDTuneError(f"terms: expected at least 2, got {terms}")
    rng = random.Random(f"{seed}:{split}")
    rows = []
    while len(rows) < num_rows:
        numbers = [rng.randrange(10 ** rng.randint(1, max_digits)) for _ in range(terms)]
        chosen = [rng.choice(ops) for _ in range(terms - 1)]
        question = " ".join([str(numbers[0])] + [f"{op} {n}" for op, n in zip(chosen, numbers[1:])])
        if (zlib.crc32(f"{seed}:{question}".encode()) % 10 == 0) != (split == "test"):
            continue
        results = [numbers[0]]
        for op, n in zip(chosen, numbers[1:]):
            results.append(OPERATIONS[op](results[-1], n))
        answer = ", ".join(str(r) for r in results[1:])
        chat = [{"role": "user", "content": f"What is {question}?"}, {"role": "assistant", "content": answer}]
        rows.append({"messages": chat})
    return rows


def write_arithmetic_jsonl(path, num_rows: int, **kwargs) -> Path:
    """Write `arithmetic_rows` to a JSONL file (for `chat_dataset` or `prompt_dataset`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows(num_rows, **kwargs)), encoding="utf-8")
    return path


@argument_checks(num_rows=integer(1), split=choice("train", "test"), seed=integer(0), max_digits=integer(1),
                 terms=integer(2), max_seq_len=integer(1, optional=True), train_on_input=boolean(), packed=boolean())
def arithmetic_dataset(
    tokenizer,
    *,
    num_rows: int = 1000,
    split: str = "train",
    seed: int = 0,
    max_digits: int = 3,
    ops: str = "+-",
    terms: int = 2,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    teacher_tokenizer=None,
) -> SFTDataset:
    """`arithmetic_rows` as a chat dataset, without a file."""
    rows = arithmetic_rows(num_rows, split=split, seed=seed, max_digits=max_digits, ops=ops, terms=terms)
    rows = [Row(f"arithmetic row {i}", row) for i, row in enumerate(rows, 1)]
    return chat_sft_dataset(
        tokenizer, rows, chat_messages, name=f"arithmetic dataset ({split})", max_seq_len=max_seq_len,
        train_on_input=train_on_input, train_on="all", packed=packed, skip_bad_rows=False,
        teacher_tokenizer=teacher_tokenizer,
    )
