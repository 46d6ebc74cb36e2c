"""The recipe tests' tiny world (tokenizer, student, peaked teacher), plus arithmetic chats: the
training rows and held-out prompts the divergence is measured on."""

import pytest

from kdtune.datasets import write_arithmetic_jsonl
from tests.recipes.conftest import kd_overrides, world  # noqa: F401  (the fixture is used by name)


@pytest.fixture(scope="session")
def chats(world):  # noqa: F811
    """``train``: a JSONL of chat rows (the problems the tokenizer was trained on); ``held_out``: rows
    of the test split, which never shares a problem with the train split."""
    root = world["root"]
    return {"train": write_arithmetic_jsonl(root / "chats.jsonl", 64, seed=1, max_digits=2),
            "held_out": write_arithmetic_jsonl(root / "held_out.jsonl", 16, split="test", seed=1, max_digits=2)}


def gkd_overrides(world, chats, out) -> list[str]:  # noqa: F811
    return [*kd_overrides(world, out), f"dataset.data_files={chats['train']}"]
