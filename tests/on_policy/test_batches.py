"""The per-step batch source of on-policy distillation, in process: masking, routing of each step's
completions (student, teacher or dataset), reproducible draws, and the checks made before a weight
loads."""

import pytest
import torch

import kdtune
from kdtune.datasets import IGNORE_INDEX, collate_prompts, prompt_dataset
from kdtune.errors import KDTuneError
from kdtune.generation import generate
from kdtune.config.settings import OnPolicySettings, read_settings
from kdtune.training import on_policy
from kdtune.training.on_policy import OnPolicyBatches, check_replies, completion_batch

EOS, PAD = 2, 0
GENERATION = {"max_new_tokens": 6, "temperature": 1.0, "top_k": None, "top_p": None}


def test_completion_batch_masks_prompt_after_first_stop_and_padding():
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, EOS, 11, 12], [13, 14, 15]]  # row 0 runs on past its stop token; row 1 never stops
    batch = completion_batch(prompts, completions, stop_ids=[EOS, 3], pad_id=PAD)
    x = IGNORE_INDEX
    assert batch["tokens"].tolist() == [[5, 6, 7, 10, EOS], [8, 9, 13, 14, 15]]
    # labels[i] is the target of the prediction at i: the completion (through the stop), nothing else
    assert batch["labels"].tolist() == [[x, x, 10, EOS, x], [x, 13, 14, 15, x]]
    short = completion_batch([[5]], [[EOS, 9]], stop_ids=[EOS], pad_id=PAD)
    wide = completion_batch([[5], [6, 7, 8]], [[EOS, 9], [10, 11]], stop_ids=[EOS], pad_id=PAD)
    assert short["labels"].tolist() == [[EOS, x]]
    assert wide["tokens"][0].tolist() == [5, EOS, PAD, PAD, PAD] and wide["labels"][0].tolist() == [EOS, x, x, x, x]


@pytest.fixture(scope="module")
def parts(world, chats):
    tok = kdtune.load_tokenizer(world["student"])
    dataset = prompt_dataset(tok, data_files=str(chats["train"]))
    micro = [collate_prompts([dataset[i] for i in range(s, s + 3)], tok.pad_id) for s in (0, 3)]
    return tok, kdtune.load_model(world["student"]), kdtune.load_model(world["teacher"]), micro


def source_of(parts, monkeypatch, steps=4, **settings):
    """Run ``steps`` steps of an OnPolicyBatches; return its batches, metrics and which model generated."""
    tok, student, teacher, micro = parts
    calls = []

    def counting_generate(model, prompts, **kwargs):
        calls.append("student" if model is student else "teacher" if model is teacher else "?")
        return generate(model, prompts, **kwargs)

    monkeypatch.setattr(on_policy, "generate", counting_generate)
    source = OnPolicyBatches(student, teacher, seed=0, generation=GENERATION, stop_ids=tok.eos_ids,
                             pad_id=tok.pad_id, vocab_size=tok.vocab_size, device=torch.device("cpu"), **settings)
    results = [source(micro) for _ in range(steps)]
    return results, calls, source


def test_lmbda_0_trains_on_the_dataset_replies_without_generating(parts, monkeypatch):
    tok, _, _, micro = parts
    results, calls, _ = source_of(parts, monkeypatch, lmbda=0.0, seq_kd=False)
    assert calls == []
    for batches, metrics in results:
        assert metrics == {"lmbda": 0.0, "on_policy_fraction": 0.0}
        for batch, prompts in zip(batches, micro):
            expected = completion_batch(on_policy.unpadded_prompts(prompts), prompts["completions"],
                                        stop_ids=tok.eos_ids, pad_id=tok.pad_id)
            assert not batch["generated"]
            assert torch.equal(batch["tokens"], expected["tokens"]) and torch.equal(batch["labels"], expected["labels"])


@pytest.mark.parametrize("lmbda, seq_kd, model", [(1.0, False, "student"), (1.0, True, "student"),
                                                 (0.0, True, "teacher")])
def test_generated_completions_come_from_the_right_model(parts, monkeypatch, lmbda, seq_kd, model):
    tok, _, _, micro = parts
    results, calls, _ = source_of(parts, monkeypatch, steps=3, lmbda=lmbda, seq_kd=seq_kd)
    assert calls == [model] * 3 * len(micro)  # every micro-batch of every step
    for batches, metrics in results:
        assert metrics["on_policy_fraction"] == (1.0 if model == "student" else 0.0)
        assert 1 <= metrics["generated_length_mean"] <= GENERATION["max_new_tokens"]
        assert metrics["generation_tokens_per_second"] > 0
        for batch, prompts in zip(batches, micro):
            assert batch["generated"]
            rows = on_policy.unpadded_prompts(prompts)
            for tokens, labels, prompt in zip(batch["tokens"], batch["labels"], rows):
                assert tokens[: len(prompt)].tolist() == prompt  # right-padded: each row starts with its prompt
                trained = labels[len(prompt) - 1 :]
                n = int((trained != IGNORE_INDEX).sum())
                assert 1 <= n <= GENERATION["max_new_tokens"]
                assert (labels[: len(prompt) - 1] == IGNORE_INDEX).all() and (trained[n:] == IGNORE_INDEX).all()
                assert set(trained[: n - 1].tolist()).isdisjoint(tok.eos_ids)  # a stop token only ends a row


def test_draws_are_reproducible_and_resume_from_the_state(parts, monkeypatch):
    results, calls, _ = source_of(parts, monkeypatch, steps=6, lmbda=0.5, seq_kd=False)
    fractions = [m["on_policy_fraction"] for _, m in results]
    assert 0 < fractions[-1] < 1
    again, calls_again, _ = source_of(parts, monkeypatch, steps=6, lmbda=0.5, seq_kd=False)
    assert calls_again == calls
    # Stop after 2 steps, carry the state over (as a checkpoint does), and go on in a fresh source.
    first, _, stopped = source_of(parts, monkeypatch, steps=2, lmbda=0.5, seq_kd=False)
    _, _, resumed = source_of(parts, monkeypatch, steps=0, lmbda=0.5, seq_kd=False)
    resumed.load_state_dict(stopped.state_dict())
    rest = [resumed(parts[3]) for _ in range(4)]
    for (batches, metrics), (batches2, metrics2) in zip(results, first + rest):
        assert {k: v for k, v in metrics.items() if k != "generation_tokens_per_second"} == \
            {k: v for k, v in metrics2.items() if k != "generation_tokens_per_second"}
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, batches2))


def test_settings_that_cannot_work_are_refused(parts, tmp_path):
    tok = parts[0]
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"prompt": "What is 1 + 2?"}\n{"prompt": "What is 3 + 4?"}\n')
    dataset = prompt_dataset(tok, data_files=str(prompts_only))
    with pytest.raises(KDTuneError, match="sample 0 has no reference reply"):
        check_replies(lmbda=0.5, seq_kd=False, dataset=dataset)
    check_replies(lmbda=1.0, seq_kd=False, dataset=dataset)
    check_replies(lmbda=0.5, seq_kd=True, dataset=dataset)
    nodes = {k: {"_component_": "x"} for k in ("checkpointer", "tokenizer", "dataset", "teacher_checkpointer")}
    nodes.update(optimizer={"_component_": "adamw", "lr": 1e-3}, kd_loss={"_component_": "jsd"},
                 lr_scheduler={"_component_": "cosine_with_warmup", "num_warmup_steps": 0})
    good = {"output_dir": "/tmp/x", "batch_size": 1, "epochs": 1, "generation": GENERATION, **nodes}
    assert read_settings(good, OnPolicySettings).generation.max_new_tokens == 6
    for change, message in (({"lmbda": 1.5}, r"lmbda: expected a number in \[0, 1\]"),
                            ({"generation": {"temprature": 1.0}}, "generation.temprature: not a setting.*temperature"),
                            ({"generation": {"temperature": 1.0}}, "generation.max_new_tokens: required")):
        with pytest.raises(KDTuneError, match=message):
            read_settings({**good, **change}, OnPolicySettings)
