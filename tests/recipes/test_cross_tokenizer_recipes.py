"""Distilling a teacher whose tokenizer differs (teacher_tokenizer, uld / hybrid_uld) through both KD
recipes: the student learns, two processes train as one, and what cannot work is one line."""

import shutil

import pytest
import torch

from kdtune.checkpointing import write_random_checkpoint
from kdtune.training import read_metrics
from kdtune.training.models import LORA_KEYS
from tests.cli_utils import REPO, assert_user_error, run_kdtune
from tests.recipes.conftest import kd_overrides, tiny_config
from tests.recipes.test_bad_input import run_in_process

MISTRAL = REPO / "tests" / "assets" / "mistral_v3_tokenizer"
TORCHRUN = ("--nproc_per_node", "2", "--standalone")
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def other_teacher(world, tmp_path_factory):
    """A 3-layer teacher that reads Mistral v0.3's sentencepiece vocabulary (32,768 tokens, its own
    chat template), where the world's student has a ChatML BPE of 300 tokens. Its weights are large
    enough that its likeliest tokens are likelier than the near-uniform student's: where every sorted
    student probability exceeds the teacher's at the same rank, ULD's gradient vanishes (the L1
    distance then moves only with the total mass, which is fixed)."""
    config = dict(tiny_config(3, 64, 4, 2, init=0.6), vocab_size=32768)
    folder = write_random_checkpoint(config, tmp_path_factory.mktemp("mistral_teacher") / "teacher", seed=1)
    for f in MISTRAL.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def cross(world, teacher, out, *extra, loss="hybrid_uld"):
    return [*kd_overrides(world, out), f"teacher_checkpointer.checkpoint_dir={teacher}",
            f"+teacher_tokenizer={teacher}", f"kd_loss._component_={loss}", *extra]


def run(args, distributed=False, expect=0):
    launch = (*TORCHRUN, "knowledge_distillation_distributed", "--config", "tiny/KD_distributed", "batch_size=2") \
        if distributed else ("knowledge_distillation_single_device", "--config", "tiny/KD_single_device", "batch_size=4")
    proc = run_kdtune("run", *launch, *args, env=ENV)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("loss", ["uld", "hybrid_uld"])
def test_the_student_moves_towards_a_teacher_of_another_tokenizer(world, other_teacher, tmp_path, loss):
    """Held-out (validation) distance to the teacher falls over 24 steps of pure distillation."""
    validation = ("+validation.every_n_steps=1", "+validation.dataset._component_=alpaca",
                  f"+validation.dataset.data_files={world['data']}", "+validation.max_batches=2")
    out = tmp_path / loss
    run(cross(world, other_teacher, out, "kd_ratio=1.0", "max_steps_per_epoch=24", "optimizer.lr=0.01",
              *(f"~model.{k}" for k in LORA_KEYS), *validation, loss=loss))
    metrics = read_metrics(out / "metrics.jsonl")
    first, last = metrics[0]["val_kd_loss"], metrics[-1]["val_kd_loss"]
    print(f"{loss}: held-out {first:.4f} -> {last:.4f}")
    assert last < 0.9 * first
    assert metrics[-1]["val_kl"] == metrics[-1]["val_kd_loss"]  # no per-token KL across vocabularies


def test_two_processes_train_as_one(world, other_teacher, tmp_path):
    steps = ("max_steps_per_epoch=3",)
    single = read_metrics(run(cross(world, other_teacher, tmp_path / "one", *steps)) and tmp_path / "one" / "metrics.jsonl")
    sharded = read_metrics(run(cross(world, other_teacher, tmp_path / "two", *steps), distributed=True) and
                           tmp_path / "two" / "metrics.jsonl")
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([m[key] for m in sharded]), torch.tensor([m[key] for m in single]),
                                   rtol=1e-5, atol=0, msg=key)


@pytest.mark.parametrize("case, fragments", [
    ("no_teacher_tokenizer", ["different tokenizers", "teacher_tokenizer", "uld"]),
    ("uld_alone", ["kd_loss", "'uld'", "teacher_tokenizer"]),
    ("divergence_across", ["teacher_tokenizer", "cross-tokenizer", "'forward_kl'"]),
    ("packed", ["packed", "teacher_tokenizer"]),
    ("not_the_teachers", ["teacher_tokenizer", "not the teacher's tokenizer", "token id 0"]),
    ("from_a_cache", ["teacher_logits_cache", "teacher_tokenizer"]),
    ("served_at_temperature_2", ["kd_loss.temperature", "temperature 1"]),
])
def test_what_cannot_work_is_one_line(world, other_teacher, tmp_path, case, fragments, capsys):
    out = tmp_path / case
    base = [*kd_overrides(world, out), f"teacher_checkpointer.checkpoint_dir={other_teacher}"]
    args = {"no_teacher_tokenizer": base,
            "uld_alone": [*kd_overrides(world, out), "kd_loss._component_=uld"],
            "divergence_across": [*base, f"+teacher_tokenizer={other_teacher}"],
            "packed": [*cross(world, other_teacher, out), "dataset.packed=true", "dataset.max_seq_len=64"],
            "not_the_teachers": [*cross(world, other_teacher, out)[:-2], f"+teacher_tokenizer={world['student']}",
                                 "kd_loss._component_=uld"],
            "from_a_cache": [*cross(world, other_teacher, out), "~teacher_checkpointer",
                             f"+teacher_logits_cache={out.parent / 'no_cache'}"],
            "served_at_temperature_2": [*cross(world, other_teacher, out), "~teacher_checkpointer",
                                        "+teacher_server.base_url=http://127.0.0.1:9/v1", "+teacher_server.model=t",
                                        "kd_loss.temperature=2.0"]}[case]
    code, err = run_in_process("knowledge_distillation_single_device", ["--config", "tiny/KD_single_device", *args],
                               capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdtune: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


def on_policy(world, teacher, chats, out, *extra, distributed=False, expect=0):
    launch = (*TORCHRUN, "on_policy_distillation_distributed", "--config", "tiny/GKD_distributed", "batch_size=2") \
        if distributed else ("on_policy_distillation_single_device", "--config", "tiny/GKD_single_device", "batch_size=4")
    args = [*kd_overrides(world, out), f"teacher_checkpointer.checkpoint_dir={teacher}", f"+teacher_tokenizer={teacher}",
            "kd_loss._component_=hybrid_uld", "~kd_loss.beta", f"dataset.data_files={chats}", *extra]
    proc = run_kdtune("run", *launch, *args, env=ENV)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc if expect else read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def chats(world):
    from kdtune.datasets import write_arithmetic_jsonl

    return write_arithmetic_jsonl(world["root"] / "cross_chats.jsonl", 64, seed=1, max_digits=2)


def test_on_policy_grades_the_students_completions_in_the_teachers_tokens(world, other_teacher, chats, tmp_path):
    """The student's greedy completions, rewritten in the teacher's tokens, on one process and on
    two (FSDP2): the same losses, steps on its own completions and on the dataset's replies alike."""
    extra = ("max_steps_per_epoch=4", "generation.temperature=0", "kd_ratio=0.5")
    single = on_policy(world, other_teacher, chats, tmp_path / "one", *extra)
    sharded = on_policy(world, other_teacher, chats, tmp_path / "two", *extra, distributed=True)
    assert any("generated_length_mean" in m for m in single) and not all("generated_length_mean" in m for m in single)
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([m[key] for m in sharded]), torch.tensor([m[key] for m in single]),
                                   rtol=1e-5, atol=0, msg=key)


@pytest.mark.parametrize("setting", ["seq_kd=true", "on_policy_loss=sampled_reverse_kl"])
def test_on_policy_estimators_that_need_the_teachers_token_scores_are_refused(world, other_teacher, chats, tmp_path,
                                                                                setting):
    proc = on_policy(world, other_teacher, chats, tmp_path / "bad", setting, expect=2)
    assert_user_error(proc, "teacher_tokenizer", setting.split("=")[0])
    assert not (tmp_path / "bad").exists()
