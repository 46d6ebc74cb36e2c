"""Intermediate-layer distillation in the KD recipes: full, LoRA and QLoRA students; 2 processes
(gloo, FSDP2) log what one process logs; a run killed with its projections in training resumes to
the uninterrupted run's losses exactly; the projections never enter the student's weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kdtune.checkpointing import write_random_checkpoint
from kdtune.training import read_metrics
from tests.cli_utils import assert_user_error, run_kdtune
from tests.recipes.conftest import KD_ONE_AND_TWO_PROCESSES, kd_overrides, tiny_config

ENV = {"OMP_NUM_THREADS": "1"}
HIDDEN = ("+hidden_state_loss._component_=cosine", "+hidden_state_loss.layers=uniform",
          "+hidden_state_loss.weight=0.5")
KEYS = ("loss", "ce_loss", "kd_loss", "hidden_state_loss", "grad_norm")


def by_step(out):
    last = {m["step"]: m for m in read_metrics(out / "metrics.jsonl")}  # a re-logged step: the later record
    return [[last[s][k] for k in KEYS] for s in sorted(last)]


@pytest.mark.parametrize("student", ["full", "lora", "qlora"])
def test_each_kind_of_student_trains_with_a_hidden_state_loss(student, world, tmp_path):
    out = tmp_path / student
    config = "tiny/KD_hidden_states_single_device" if student == "full" else "tiny/KD_single_device"
    extra = () if student == "full" else HIDDEN
    extra += ("model.quantize_base=true",) if student == "qlora" else ()
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", config, *kd_overrides(world, out),
                      "max_steps_per_epoch=3", *extra, env=ENV)
    assert proc.returncode == 0, proc.stderr
    metrics = by_step(out)
    assert len(metrics) == 3 and all(0 < m[3] < 2 for m in metrics)  # a cosine distance
    for m in metrics:  # the logged loss is the three terms' mix
        assert m[0] == pytest.approx(0.5 * m[1] + 0.5 * m[2] + 0.5 * m[3], rel=1e-5)
    weights = load_file(out / "epoch_1" / "model.safetensors")
    assert not any("projection" in k for k in weights)  # the student's weights alone
    state = torch.load(out / "epoch_1" / "recipe_state.pt", weights_only=True)
    assert set(state["hidden_state_loss"]) == {"projections.0.weight", "projections.1.weight"}


def test_two_processes_log_what_one_logs_with_projections_of_another_width(world, tmp_path):
    # A narrower student (hidden 48, teacher 64): the projections map 48 -> 64.
    narrow = write_random_checkpoint(tiny_config(2, 48, 4, 2), tmp_path / "narrow")
    for f in world["tokenizer"].iterdir():
        (narrow / f.name).write_bytes(f.read_bytes())
    worlds = {**world, "student": narrow}
    runs = {}
    for name, launch in KD_ONE_AND_TWO_PROCESSES:
        out = tmp_path / name
        proc = run_kdtune("run", *launch, *kd_overrides(worlds, out), "max_steps_per_epoch=3", *HIDDEN,
                          "save_every_n_steps=2", env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = by_step(out)
    assert len(runs["single"]) == 3
    torch.testing.assert_close(torch.tensor(runs["sharded"]), torch.tensor(runs["single"]), rtol=1e-5, atol=0)
    projections = [torch.load(tmp_path / name / "epoch_1" / "recipe_state.pt", weights_only=True)["hidden_state_loss"]
                   for name in ("single", "sharded")]
    for key in projections[0]:
        assert projections[0][key].shape == (64, 48)
        torch.testing.assert_close(projections[1][key], projections[0][key], rtol=1e-5, atol=1e-6)


def test_a_run_killed_with_projections_in_training_resumes_exactly(world, tmp_path):
    args = ("epochs=2", "save_every_n_steps=4", "batch_size=2", "max_steps_per_epoch=8")
    recipe, config = "knowledge_distillation_single_device", "tiny/KD_hidden_states_single_device"
    whole = tmp_path / "whole"
    proc = run_kdtune("run", recipe, "--config", config, *kd_overrides(world, whole), *args, env=ENV)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "killed"
    killed = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", "run", recipe, "--config", config,
                               *kd_overrides(world, out), *args], env={**os.environ, **ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "step_4" / "recipe_state.pt").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    proc = run_kdtune("run", recipe, "--config", config, *kd_overrides(world, out), *args,
                      "resume_from_checkpoint=true", env=ENV)
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(torch.tensor(by_step(out)), torch.tensor(by_step(whole)), rtol=1e-6, atol=1e-7)


def test_where_hidden_states_cannot_be_matched_it_says_so(world, tmp_path):
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_hidden_states_single_device",
                      *kd_overrides(world, tmp_path / "a"), "~teacher_checkpointer",
                      f"+teacher_logits_cache={tmp_path}")
    assert_user_error(proc, "hidden_state_loss: the teacher cache holds no hidden states")
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_hidden_states_single_device",
                      *kd_overrides(world, tmp_path / "b"), "hidden_state_loss.layers=[[0,5]]")
    assert_user_error(proc, "hidden_state_loss: layers: [0, 5] names no layer pair")
    assert not (tmp_path / "b").exists()
    proc = run_kdtune("run", "on_policy_distillation_single_device", "--config", "tiny/GKD_single_device",
                      *kd_overrides(world, tmp_path / "c"), *HIDDEN)
    assert_user_error(proc, "hidden_state_loss: on-policy distillation")
