"""The README's three edits to a copied recipe, applied as written to a `kdtune cp` copy and run:
the kd_ratio schedule is logged as it should be and survives a kill -9 and a resume exactly, the
custom metric is the token-weighted top-1 agreement (equal to its definition, whatever the
micro-batch split), and the parameter groups train at their own learning rates."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import kdtune
from kdtune.datasets import alpaca_dataset
from kdtune.training import read_metrics
from tests.cli_utils import REPO, run_kdtune
from tests.recipes.conftest import kd_overrides

README = (REPO / "README.md").read_text()
ENV = {"OMP_NUM_THREADS": "1"}


def hunks(edit: str) -> list[tuple[str, str]]:
    """(old text, new text) of each diff block the README tags ``<!-- edit: NAME -->``."""
    blocks = re.findall(rf"<!-- edit: {edit} -->\n```diff\n(.*?)```", README, re.S)
    assert blocks, f"the README has no '{edit}' edit"
    out = []
    for block in blocks:
        lines = block.splitlines()
        old = [line[1:] for line in lines if line[0] in " -"]
        new = [line[1:] for line in lines if line[0] in " +"]
        out.append(("\n".join(old) + "\n", "\n".join(new) + "\n"))
    return out


def edited_recipe(edit: str, folder) -> str:
    """`kdtune cp` the KD recipe into ``folder`` and apply the README's ``edit`` to the copy."""
    path = folder / f"{edit}.py"
    proc = run_kdtune("cp", "knowledge_distillation_single_device", path)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    for old, new in hunks(edit):
        assert text.count(old) == 1, f"the README's '{edit}' edit does not apply:\n{old}"
        text = text.replace(old, new)
    path.write_text(text)
    return str(path)


def run(recipe, config, world, out, *extra):
    proc = run_kdtune("run", recipe, "--config", config, *kd_overrides(world, out), *extra, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def by_step(metrics, key):
    last = {m["step"]: m[key] for m in metrics}  # a resumed run's repeated step: the later record wins
    return [last[s] for s in sorted(last)]


def test_kd_ratio_schedule_is_logged_and_survives_kill_and_resume(world, tmp_path):
    recipe = edited_recipe("kd_ratio_schedule", tmp_path)
    args = ("epochs=2", "max_steps_per_epoch=6", "save_every_n_steps=4", "batch_size=2")
    whole = run(recipe, "tiny/KD_single_device", world, tmp_path / "whole", *args)
    assert by_step(whole, "kd_ratio") == pytest.approx([0.5 * step / 11 for step in range(12)])  # 0 to 0.5
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", "run", recipe, "--config", "tiny/KD_single_device",
                             *kd_overrides(world, out), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **ENV})
    deadline = time.monotonic() + 300
    while not (out / "step_4" / "recipe_state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run(recipe, "tiny/KD_single_device", world, out, *args, "resume_from_checkpoint=true")
    for key in ("kd_ratio", "loss", "ce_loss", "kd_loss"):
        assert by_step(resumed, key) == pytest.approx(by_step(whole, key), rel=1e-6, abs=1e-9), key


def agreement(world, samples: int) -> float:
    """Top-1 agreement of the untrained student with the teacher on the first ``samples`` samples."""
    tok = kdtune.load_tokenizer(world["student"])
    student, teacher = kdtune.load_model(world["student"]), kdtune.load_model(world["teacher"])
    agree = total = 0
    for sample in list(alpaca_dataset(tok, data_files=str(world["data"]), max_seq_len=256))[:samples]:
        tokens, labels = torch.tensor([sample["tokens"]]), torch.tensor(sample["labels"])
        keep = labels != -100
        with torch.no_grad():
            s, t = student(tokens)[0, keep, : tok.vocab_size], teacher(tokens)[0, keep, : tok.vocab_size]
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        total += int(keep.sum())
    return agree / total


def test_custom_metric_is_the_token_weighted_agreement(world, tmp_path):
    recipe = edited_recipe("top1_agreement", tmp_path)
    common = ("max_steps_per_epoch=2", "shuffle=false")
    whole = run(recipe, "tiny/KD_full_single_device", world, tmp_path / "whole", *common, "batch_size=4")
    split = run(recipe, "tiny/KD_full_single_device", world, tmp_path / "split", *common, "batch_size=2",
                "gradient_accumulation_steps=2")
    assert all(0 <= m["top1_agreement"] <= 1 for m in whole + split)
    want = agreement(world, 4)  # step 1: the untrained student on the first 4 samples
    assert whole[0]["top1_agreement"] == pytest.approx(want) and split[0]["top1_agreement"] == pytest.approx(want)


def test_lora_b_matrices_train_at_their_own_learning_rate(world, tmp_path):
    recipe = edited_recipe("lora_plus", tmp_path)
    out = tmp_path / "run"
    run(recipe, "tiny/KD_single_device", world, out, "max_steps_per_epoch=2", "optimizer.lr=0.01")
    groups = torch.load(out / "epoch_1" / "recipe_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.01, 0.04])
    model = kdtune.load_model(world["student"])
    layers, lora_modules = len(model.layers), 4 + 3  # q, k, v, o and the MLP's gate, up, down
    assert [len(g["params"]) for g in groups] == [layers * lora_modules, layers * lora_modules]
