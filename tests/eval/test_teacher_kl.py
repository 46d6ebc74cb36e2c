"""held_out_scores, the judge of the demos and the seeded KD-versus-SFT test, against the textbook
formulas written out here with torch.distributions (float64, whole logits)."""

import json

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import kdtune
from kdtune.checkpointing import write_random_checkpoint
from kdtune.datasets import chat_dataset
from kdtune.eval.teacher_kl import held_out_scores
from tests.recipes.conftest import tiny_config, world  # noqa: F401 (the tiny world fixture)

CHATS = [[{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}],
         [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]]


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_kl")
    narrow = write_random_checkpoint(dict(tiny_config(2, 64, 4, 2, init=0.3), vocab_size=304), root / "narrow", seed=7)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return kdtune.load_model(world["student"]), kdtune.load_model(world["teacher"]), kdtune.load_model(narrow), data


def reference(model, teacher, tokenizer, data):
    kl, ce, count = 0.0, 0.0, 0
    for sample in chat_dataset(tokenizer, data_files=str(data)):
        ids, labels = torch.tensor([sample["tokens"]]), torch.tensor(sample["labels"])
        for pos in (labels != -100).nonzero().flatten().tolist():
            with torch.no_grad():
                q, p = model(ids)[0, pos].double(), teacher(ids)[0, pos].double()
            width = min(len(q), len(p))
            q, p = Categorical(logits=q[:width]), Categorical(logits=p[:width])
            kl += kl_divergence(p, q).item()
            ce -= q.log_prob(labels[pos]).item()
            count += 1
    return kl / count, ce / count


def test_matches_the_formulas_and_is_zero_for_the_teacher_itself(world, models):
    student, teacher, narrow, data = models
    tokenizer = kdtune.load_tokenizer(world["student"])
    got = held_out_scores(student, teacher, tokenizer, data)
    kl, ce = reference(student, teacher, tokenizer, data)
    assert got["kl_to_teacher"] == pytest.approx(kl, rel=1e-9) and got["ce_on_replies"] == pytest.approx(ce, rel=1e-9)
    assert kl > 0.01
    assert held_out_scores(teacher, teacher, tokenizer, data)["kl_to_teacher"] == pytest.approx(0.0, abs=1e-12)
    # a teacher with a narrower output (304 rows against 320): both scored on its 304 ids
    got = held_out_scores(student, narrow, tokenizer, data)
    assert got["kl_to_teacher"] == pytest.approx(reference(student, narrow, tokenizer, data)[0], rel=1e-9)
