"""What a run learns, end to end: a student distilled from a teacher that knows the task (on 64 labeled
chats and 896 more prompts, with the teacher's distributions along their replies) ends closer to it
on problems neither saw than the same student fine-tuned on the 64 labeled chats for as many steps —
at each of two seeds, by a margin far from the edge. A KD path that computes the right numbers but trains the
wrong thing (a sign, a swapped model, a lost term) fails here even when every per-call check passes.
"""

import json

import pytest

import kdtune
from kdtune.datasets import arithmetic_rows
from kdtune.eval.teacher_kl import held_out_scores
from tests.cli_utils import run_kdtune

pytestmark = pytest.mark.slow

TASK = dict(max_digits=2, ops="+")
SEEDS = (0, 1)
# KD's held-out KL to the teacher must be below this fraction of SFT's at every seed. Measured on
# this project's CPU: 0.257 against 0.477 at seed 0 and 0.292 against 0.497 at seed 1 (ratios 0.54,
# 0.59); a KD that learned nothing from the teacher would sit near 1.
MAX_KL_RATIO = 0.8


def write_chats(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(*args, out):
    proc = run_kdtune("run", *args, f"output_dir={out}", "save_every_n_steps=null", "dataset=chat",
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "epoch_1"


def test_kd_ends_closer_to_the_teacher_than_sft_at_every_seed(world, tmp_path):
    held_out = arithmetic_rows(64, split="test", seed=1, **TASK)
    questions = {r["messages"][0]["content"] for r in held_out}
    train_rows = [r for r in arithmetic_rows(4000, seed=1, **TASK) if r["messages"][0]["content"] not in questions]
    teacher_data = write_chats(tmp_path / "teacher.jsonl", train_rows[:2400])  # 150 steps of 16
    labeled = train_rows[2400:2400 + 64]
    data = {"sft": write_chats(tmp_path / "sft.jsonl", labeled * 15),  # 60 steps of 16
            "kd": write_chats(tmp_path / "kd.jsonl", labeled + train_rows[2464:2464 + 896])}
    held_out_file = write_chats(tmp_path / "held_out.jsonl", held_out)

    # A teacher that knows the task: the world's 3-layer model trained on 2,400 problems.
    teacher = train("full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                    f"checkpointer.checkpoint_dir={world['teacher']}", f"dataset.data_files={teacher_data}",
                    "batch_size=16", "optimizer.lr=0.003", out=tmp_path / "teacher")
    tokenizer, teacher_model = kdtune.load_tokenizer(teacher), kdtune.load_model(teacher)
    scores = {}
    for seed in SEEDS:
        common = [f"checkpointer.checkpoint_dir={world['student']}", "batch_size=16", "optimizer.lr=0.003",
                  f"seed={seed}"]
        sft = train("full_finetune_single_device", "--config", "tiny/full_finetune_single_device", *common,
                    f"dataset.data_files={data['sft']}", out=tmp_path / f"sft_{seed}")
        kd = train("knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device", *common,
                   f"dataset.data_files={data['kd']}", "kd_ratio=1.0", f"teacher_checkpointer.checkpoint_dir={teacher}",
                   out=tmp_path / f"kd_{seed}")
        scores[seed] = {name: held_out_scores(folder, teacher_model, tokenizer, held_out_file)["kl_to_teacher"]
                        for name, folder in (("sft", sft), ("kd", kd))}
    for seed, s in scores.items():
        assert s["kd"] < MAX_KL_RATIO * s["sft"], scores
