"""Validation during training: the held-out losses a run logs equal the same losses computed here
from their definitions on the checkpoint of that step, and 2 processes (gloo, FSDP2) log what one
process logs, also when the held-out set does not divide among the processes."""

import json

import pytest
import torch

import kdtune
from kdtune.datasets import alpaca_dataset, arithmetic_rows
from kdtune.training import read_metrics
from tests.cli_utils import assert_user_error, run_kdtune
from tests.recipes.conftest import KD_ONE_AND_TWO_PROCESSES, base_overrides, kd_overrides

HELD_OUT = 13  # not a multiple of 2 processes x 2 per batch: one rank pads its last batch
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def held_out(world):
    rows = arithmetic_rows(HELD_OUT, split="test", seed=1, max_digits=2)
    path = world["root"] / "held_out_alpaca.json"
    path.write_text(json.dumps([{"instruction": r["messages"][0]["content"], "input": "",
                                 "output": r["messages"][1]["content"]} for r in rows]))
    return path


def validation(path, every=2) -> list[str]:
    return [f"+validation.every_n_steps={every}", "+validation.dataset._component_=alpaca",
            f"+validation.dataset.data_files={path}", "+validation.dataset.max_seq_len=256"]


def val_metrics(out) -> dict[int, dict]:
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("val_")}
            for m in read_metrics(out / "metrics.jsonl") if "val_loss" in m}


def reference(student_dir, teacher_dir, data, vocab) -> dict[str, float]:
    """Mean CE on the held-out replies and mean KL(teacher || student), in float64, from their definitions."""
    tok = kdtune.load_tokenizer(student_dir)
    student, teacher = kdtune.load_model(student_dir), kdtune.load_model(teacher_dir)
    ce = kl = count = 0.0
    for sample in alpaca_dataset(tok, data_files=str(data), max_seq_len=256):
        tokens, labels = torch.tensor([sample["tokens"]]), torch.tensor(sample["labels"])
        keep = labels != -100
        with torch.no_grad():
            log_q = student(tokens)[0, keep, :vocab].double().log_softmax(-1)
            log_p = teacher(tokens)[0, keep, :vocab].double().log_softmax(-1)
        ce -= log_q.gather(-1, labels[keep, None]).sum().item()
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        count += int(keep.sum())
    return {"val_ce_loss": ce / count, "val_kl": kl / count}


def test_validation_losses_equal_their_definitions_on_the_step_checkpoint(world, held_out, tmp_path):
    out = tmp_path / "kd"
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
                      *kd_overrides(world, out), "max_steps_per_epoch=4", "save_every_n_steps=2",
                      *validation(held_out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = val_metrics(out)
    assert sorted(logged) == [2, 4]
    vocab = kdtune.load_tokenizer(world["student"]).vocab_size
    want = reference(out / "step_2", world["teacher"], held_out, vocab)
    for key, value in want.items():
        assert logged[2][key] == pytest.approx(value, rel=1e-4), key
    # forward_kl at temperature 1 is the KL itself; the loss mixes CE and KL at kd_ratio 0.5
    assert logged[2]["val_kd_loss"] == pytest.approx(logged[2]["val_kl"], rel=1e-6)
    assert logged[2]["val_loss"] == pytest.approx(0.5 * want["val_ce_loss"] + 0.5 * want["val_kl"], rel=1e-4)
    assert logged[4]["val_kl"] < logged[2]["val_kl"]
    # the step's model card says how it was made, from the run's records up to that step
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "step_2" / "README.md")
    assert "distillation" in card.data.tags and card.data.base_model is None  # a local folder: named in the text
    assert str(world["student"].resolve()) in card.text
    assert "Recipe: `knowledge_distillation_single_device`" in card.text
    assert f"Teacher: `{world['teacher']}`" in card.text and "kd_ratio=0.5" in card.text
    assert f"val_kl={logged[2]['val_kl']:.4f}" in card.text and "Steps: 2 " in card.text


def test_supervised_validation_is_the_held_out_cross_entropy(world, held_out, tmp_path):
    out = tmp_path / "sft"
    proc = run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                      *base_overrides(world, out), "max_steps_per_epoch=2", *validation(held_out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = val_metrics(out)[2]
    vocab = kdtune.load_model(world["student"]).args.vocab_size  # SFT scores the whole output width
    assert logged["val_loss"] == pytest.approx(reference(out / "epoch_1", world["teacher"], held_out,
                                                         vocab)["val_ce_loss"], rel=1e-4)


def test_two_processes_log_the_validation_of_one(world, held_out, tmp_path):
    runs = {}
    for name, launch in KD_ONE_AND_TWO_PROCESSES:
        out = tmp_path / name
        proc = run_kdtune("run", *launch, *kd_overrides(world, out), "max_steps_per_epoch=4",
                          *validation(held_out), "+validation.batch_size=2", env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = val_metrics(out)
    assert sorted(runs["single"]) == sorted(runs["sharded"]) == [2, 4]
    for step, metrics in runs["single"].items():
        assert set(metrics) == {"val_loss", "val_ce_loss", "val_kd_loss", "val_kl"}
        for key, value in metrics.items():
            assert runs["sharded"][step][key] == pytest.approx(value, rel=1e-5), (step, key)


def test_validation_settings_are_checked_before_anything_loads(world, held_out, tmp_path):
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, tmp_path / "bad"), *validation(held_out, every=0))
    assert_user_error(proc, "validation.every_n_steps", "positive integer")
    assert not (tmp_path / "bad").exists()
