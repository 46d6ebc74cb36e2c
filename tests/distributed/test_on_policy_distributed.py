"""The distributed on-policy recipe on 2 CPU processes (gloo, FSDP2) against the single-device one on
the same global batches, its resume, and generation from a sharded model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kdtune.datasets import write_arithmetic_jsonl
from kdtune.training import read_metrics
from tests.cli_utils import REPO, assert_user_error, run_kdtune
from tests.distributed.test_distributed_recipes import ENV, TORCHRUN, assert_same_weights
from tests.recipes.conftest import kd_overrides

KEYS = ("loss", "kd_loss", "grad_norm", "num_tokens", "on_policy_fraction", "generated_length_mean")


@pytest.fixture(scope="module")
def chats(world):
    return write_arithmetic_jsonl(world["root"] / "gkd_chats.jsonl", 64, seed=1, max_digits=2)


def run_gkd(world, chats, out, *extra, distributed=True, expect=0):
    if distributed:
        launch = (*TORCHRUN, "on_policy_distillation_distributed", "--config", "tiny/GKD_distributed", "batch_size=2")
    else:
        launch = ("on_policy_distillation_single_device", "--config", "tiny/GKD_single_device", "batch_size=4")
    proc = run_kdtune("run", *launch, *kd_overrides(world, out), f"dataset.data_files={chats}", *extra, env=ENV)
    assert proc.returncode == expect, proc.stderr[-4000:]
    if expect:
        return proc
    last = {m["step"]: m for m in read_metrics(out / "metrics.jsonl")}  # a resumed run's repeated step: the later
    return [[last[s].get(k) for k in KEYS] for s in sorted(last)]


def test_greedy_gkd_on_two_processes_matches_one(world, chats, tmp_path):
    """Greedy completions do not depend on how prompts are split over processes, so both runs train
    on the same tokens: the same losses, gradient norms and weights (LoRA student, lmbda 0.5: steps
    on the student's completions and on the dataset's replies, kd_ratio 0.5 on the latter)."""
    extra = ("max_steps_per_epoch=6", "generation.temperature=0", "kd_ratio=0.5", "+model.lora_rank=4",
             "+model.lora_alpha=8")
    single = run_gkd(world, chats, tmp_path / "single", *extra, distributed=False)
    sharded = run_gkd(world, chats, tmp_path / "sharded", *extra)
    assert len(sharded) == 6 and any(row[-1] is not None for row in sharded) and any(row[-1] is None for row in sharded)
    for a, b in zip(sharded, single):
        assert a[-3:] == b[-3:]  # tokens, the source drawn, completion lengths
        torch.testing.assert_close(torch.tensor(a[:3]), torch.tensor(b[:3]), rtol=1e-5, atol=0)
    assert_same_weights(tmp_path / "sharded" / "epoch_1", tmp_path / "single" / "epoch_1", 1e-5)


def test_sampled_reverse_kl_on_two_processes_resumes_exactly(world, chats, tmp_path):
    """Sampling at temperature 1, each process from its own generator (saved per process), with the
    sampled-token estimator: a run killed after its step-3 checkpoint and resumed draws and trains
    what the uninterrupted run did."""
    extra = ("max_steps_per_epoch=6", "save_every_n_steps=3", "lmbda=1", "on_policy_loss=sampled_reverse_kl")
    whole = run_gkd(world, chats, tmp_path / "whole", *extra)
    assert len(whole) == 6 and all(row[-1] is not None for row in whole)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "epoch_1")
    (cut / "metrics.jsonl").write_text("".join((cut / "metrics.jsonl").read_text().splitlines(True)[:4]))
    resumed = run_gkd(world, chats, cut, *extra, "resume_from_checkpoint=true")
    torch.testing.assert_close(torch.tensor(resumed, dtype=torch.float64), torch.tensor(whole, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert_same_weights(tmp_path / "whole" / "epoch_1", cut / "epoch_1", 1e-6)


def test_a_served_student_sampler_is_refused(world, chats, tmp_path):
    proc = run_gkd(world, chats, tmp_path / "bad", "+student_server.base_url=http://127.0.0.1:9/v1",
                   "+student_server.model=s", "+model.lora_rank=4", expect=2)
    assert_user_error(proc, "student_server", "on_policy_distillation_single_device")
    assert not (tmp_path / "bad").exists()


def test_a_sharded_model_generates_what_the_whole_one_does(world, tmp_path):
    """Ranks whose rows stop at different steps (rank 0 after one token, rank 1 never) each get the
    unsharded model's completion, and the weights are sharded again afterwards."""
    script = REPO / "tests" / "distributed" / "sharded_generation.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *TORCHRUN, str(script), str(world["student"]),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.json.{rank}").read_text()) for rank in (0, 1)]
    assert len(ranks[0]["sharded"]) == 1 and len(ranks[1]["sharded"]) == 8
    for rank in ranks:
        assert rank["sharded"] == rank["reference"] and rank["resharded"]
