"""SIGINT and SIGTERM stop a training run cleanly: after the step in progress (with a checkpoint
there when save_on_interrupt is set), or at once on a second signal — also in the middle of a save.
Each ends with one line saying where it stopped and which checkpoint a resume uses, exit status
128 + the signal, no traceback, and a resume reproduces the uninterrupted run's losses exactly."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdtune.checkpointing import latest_checkpoint
from kdtune.training import read_metrics
from tests.cli_utils import run_kdtune
from tests.recipes.conftest import base_overrides

RECIPE, CONFIG = "full_finetune_single_device", "tiny/full_finetune_single_device"
ARGS = ("epochs=3", "save_every_n_steps=4", "batch_size=2")
ENV = {"OMP_NUM_THREADS": "1"}


def losses(out):
    last = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}  # a re-logged step: the later
    return [last[s] for s in sorted(last)]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = run_kdtune("run", RECIPE, "--config", CONFIG, *base_overrides(world, out), *ARGS, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return losses(out)


def start(world, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", "run", RECIPE, "--config", CONFIG,
                             *base_overrides(world, out), *ARGS, *extra], env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, what):
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def stop_line(proc, signum) -> str:
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + signum, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("signum, save_on_interrupt", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["sigint", "sigterm_saving"])
def test_a_signal_during_training_stops_after_the_step(signum, save_on_interrupt, world, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(world, out, f"save_on_interrupt={str(save_on_interrupt).lower()}")
    wait_for(lambda: (out / "step_4" / "recipe_state.pt").exists(), proc, "its step-4 checkpoint")
    proc.send_signal(signum)
    line = stop_line(proc, signum)
    match = re.fullmatch(rf"kdtune: stopped by {signal.Signals(signum).name} after step (\d+); "
                         rf"resume_from_checkpoint=true continues from (.+)", line)
    assert match, line
    step, resumes_from = int(match[1]), match[2]
    assert resumes_from == str(latest_checkpoint(out, with_recipe_state=True))
    if save_on_interrupt:
        assert resumes_from == str(out / f"step_{step}")  # the stop saved the step it stopped after
    resumed = run_kdtune("run", RECIPE, "--config", CONFIG, *base_overrides(world, out), *ARGS,
                         "resume_from_checkpoint=true", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(uninterrupted), rtol=1e-6, atol=1e-6)


def test_two_signals_during_a_save_stop_at_once_and_leave_no_partial_checkpoint(world, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(world, out, "save_every_n_steps=1")
    saving = lambda: any(p.name.startswith(".step_") for p in out.glob(".*")) if out.is_dir() else False  # noqa: E731
    wait_for(lambda: (out / "step_3").exists() and saving(), proc, "a save in progress")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    line = stop_line(proc, signal.SIGTERM)
    assert re.fullmatch(r"kdtune: stopped by SIGTERM (during a step|after step \d+); "
                        r"resume_from_checkpoint=true continues from .+", line), line
    resumed = run_kdtune("run", RECIPE, "--config", CONFIG, *base_overrides(world, out), *ARGS, "save_every_n_steps=1",
                         "resume_from_checkpoint=true", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in out.glob(".step_*")]  # the interrupted save's folder is gone
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(uninterrupted), rtol=1e-6, atol=1e-6)


def test_ctrl_c_before_training_is_one_line_and_writes_nothing(world, tmp_path):
    """Ctrl-C while kdtune imports or sets up (before the run's handlers exist, or after)."""
    for delay in (0.3, 2.5):
        out = tmp_path / f"run_{delay}"
        proc = start(world, out)
        time.sleep(delay)
        if proc.poll() is not None or (out / "metrics.jsonl").exists():
            continue  # the machine was quicker than the delay: nothing to interrupt before training
        proc.send_signal(signal.SIGINT)
        line = stop_line(proc, signal.SIGINT)
        if "after step" not in line:
            assert line in ("kdtune: interrupted", "kdtune: stopped by SIGINT before training began; no checkpoint "
                                                   "yet, so a rerun starts from the beginning"), line
            assert not out.exists()
