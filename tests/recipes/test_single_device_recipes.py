"""The single-device recipes end to end through `kdtune run` on tiny checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import kdtune
from kdtune.checkpointing import ADAPTER_SUBDIR
from kdtune.training import read_metrics
from tests.cli_utils import assert_user_error, run_kdtune
from tests.recipes.conftest import base_overrides, kd_overrides

RECIPES = {
    "full": ("full_finetune_single_device", "tiny/full_finetune_single_device", base_overrides),
    "lora": ("lora_finetune_single_device", "tiny/lora_finetune_single_device", base_overrides),
    "kd_lora": ("knowledge_distillation_single_device", "tiny/KD_single_device", kd_overrides),
    "kd_full": ("knowledge_distillation_single_device", "tiny/KD_full_single_device", kd_overrides),
}


def run_recipe(kind, world, out, *extra):
    recipe, config, overrides = RECIPES[kind]
    proc = run_kdtune("run", recipe, "--config", config, *overrides(world, out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def losses(metrics, key="loss"):
    last = {m["step"]: m[key] for m in metrics}  # a resumed run's repeated step: the later wins
    return [last[s] for s in sorted(last)]


def first_and_last_quarter(values):
    q = max(len(values) // 4, 1)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("kind", list(RECIPES))
def test_loss_goes_down_and_checkpoint_loads(kind, world, tmp_path):
    out = tmp_path / kind
    pure_kd = ("kd_ratio=1.0",) if kind.startswith("kd") else ()  # a random teacher and the data disagree
    metrics = run_recipe(kind, world, out, "epochs=3", "batch_size=8", *pure_kd)
    start, end = first_and_last_quarter(losses(metrics))
    assert end < 0.9 * start, (start, end)
    if kind.startswith("kd"):
        assert {"ce_loss", "kd_loss", "lr", "tokens_per_second", "grad_norm", "peak_memory_gb"} <= set(metrics[0])
    final = out / "epoch_3"
    model = kdtune.load_model(final)
    tokens = torch.randint(0, 300, (2, 12))
    assert torch.isfinite(logits_of(model, tokens)).all()
    transformers = pytest.importorskip("transformers", reason="transformers is the reference loader")
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32)
    torch.testing.assert_close(hf(tokens).logits, logits_of(model, tokens), atol=1e-5, rtol=1e-5)
    if kind in ("lora", "kd_lora"):
        peft = pytest.importorskip("peft", reason="peft is the reference adapter loader")
        base = transformers.AutoModelForCausalLM.from_pretrained(world["student"], torch_dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(base, final / ADAPTER_SUBDIR)
        # The merged weights equal base + adapter.
        torch.testing.assert_close(adapted(tokens).logits, logits_of(model, tokens), atol=1e-5, rtol=1e-5)


def test_loss_forms_agree(world, tmp_path):
    first = {}
    for form in ("fused", "chunked", "full"):
        metrics = run_recipe("kd_full", world, tmp_path / form, f"loss_form={form}", "max_steps_per_epoch=3",
                             "loss_chunk_size=7", "kd_loss=jsd")
        first[form] = [(m["loss"], m["ce_loss"], m["kd_loss"]) for m in metrics]
    for form in ("chunked", "full"):
        torch.testing.assert_close(torch.tensor(first[form]), torch.tensor(first["fused"]), atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_matches_a_larger_batch(world, tmp_path):
    big = run_recipe("full", world, tmp_path / "big", "batch_size=8", "shuffle=false", "max_steps_per_epoch=3")
    accum = run_recipe("full", world, tmp_path / "accum", "batch_size=4", "gradient_accumulation_steps=2",
                       "shuffle=false", "max_steps_per_epoch=3")
    torch.testing.assert_close(torch.tensor(losses(accum)), torch.tensor(losses(big)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["kd_lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(kind, world, tmp_path):
    args = ("epochs=2", "save_every_n_steps=3")
    whole = run_recipe(kind, world, tmp_path / "whole", *args)
    # A run killed right after its step-6 checkpoint: what is on disk at that moment.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for later in [p for p in cut.iterdir() if p.is_dir() and p.name != "step_6"]:
        if later.name.startswith("epoch") or int(later.name.split("_")[1]) > 6:
            shutil.rmtree(later)
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(lines[:7]))  # it had logged step 7 before the kill
    resumed = run_recipe(kind, world, cut, *args, "resume_from_checkpoint=true")
    assert len(losses(resumed)) == len(losses(whole))
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(whole)), atol=1e-6, rtol=1e-6)
    a, b = kdtune.load_model(tmp_path / "whole" / "epoch_2"), kdtune.load_model(cut / "epoch_2")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=name)


def test_qlora_distillation_runs_on_cpu(world, tmp_path):
    metrics = run_recipe("kd_lora", world, tmp_path / "qlora", "model.quantize_base=true", "max_steps_per_epoch=3",
                         "teacher.quantize=nf4")
    assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert kdtune.load_model(tmp_path / "qlora" / "epoch_1") is not None


def test_int8_teacher_and_low_bit_optimizer(world, tmp_path):
    metrics = run_recipe("kd_full", world, tmp_path / "int8", "teacher.quantize=int8", "max_steps_per_epoch=2",
                         "optimizer=adamw_8bit")
    assert len(metrics) == 2


@pytest.mark.parametrize("override, fragment", [
    ("kd_ratio=1.5", "kd_ratio"),
    ("+kd_loss.beta=2", "beta"),
    ("kd_loss=no_such_loss", "no_such_loss"),
    ("teacher.quantize=int3", "teacher.quantize"),
    ("loss_form=sparse", "loss_form"),
])
def test_bad_settings_are_user_errors(world, tmp_path, override, fragment):
    out = tmp_path / "bad"
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, out), override)
    assert_user_error(proc, fragment)
    assert not any(p.name.startswith(("step_", "epoch_")) for p in out.glob("*"))


def test_an_output_dir_that_is_a_file_is_refused(world, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    proc = run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                      *base_overrides(world, out))
    assert_user_error(proc, "output_dir", "is a file")
    assert out.read_text() == "keep me"


def test_mismatched_tokenizers_and_empty_data_are_refused(world, tmp_path):
    other = tmp_path / "other_teacher"
    shutil.copytree(world["teacher"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, two ids swapped: a different tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, tmp_path / "a"), f"teacher_checkpointer.checkpoint_dir={other}")
    assert_user_error(proc, "tokenizer")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    proc = run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                      *base_overrides(world, tmp_path / "b"), f"dataset.data_files={empty}")
    assert_user_error(proc)


def test_output_dir_of_an_earlier_run_is_never_overwritten(world, tmp_path):
    out = tmp_path / "run"
    run_recipe("full", world, out, "max_steps_per_epoch=2")
    before = (out / "metrics.jsonl").read_text()
    proc = run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                      *base_overrides(world, out), "max_steps_per_epoch=2")
    assert_user_error(proc, "resume_from_checkpoint")
    assert (out / "metrics.jsonl").read_text() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    proc = run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                      *base_overrides(world, out), "optimizer.lr=1e30", "clip_grad_norm=null",
                      "lr_scheduler.num_warmup_steps=0", "save_every_n_steps=1", "epochs=3")
    assert_user_error(proc, "at step", "last good checkpoint")
    assert (out / "step_1" / "config.json").is_file()


def test_a_run_killed_mid_training_resumes_to_the_same_losses(world, tmp_path):
    """A real SIGKILL once a checkpoint exists (the process may be mid-step or mid-save), then a resume."""
    args = ("epochs=4", "save_every_n_steps=4", "batch_size=2")
    whole = run_recipe("full", world, tmp_path / "whole", *args)
    out = tmp_path / "killed"
    recipe, config, overrides = RECIPES["full"]
    proc = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", "run", recipe, "--config", config,
                             *overrides(world, out), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (out / "step_4" / "recipe_state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "epoch_4").exists()
    resumed = run_recipe("full", world, out, *args, "resume_from_checkpoint=true")
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(whole)), atol=1e-6, rtol=1e-6)


def test_bf16_autocast_tracks_the_fp32_run(world, tmp_path):
    """Matmuls in bf16 with float32 weights, optimizer and loss math: the losses stay close."""
    fp32 = run_recipe("kd_full", world, tmp_path / "fp32", "max_steps_per_epoch=4")
    bf16 = run_recipe("kd_full", world, tmp_path / "bf16", "max_steps_per_epoch=4", "autocast=bf16")
    for key in ("loss", "ce_loss", "kd_loss"):
        torch.testing.assert_close(torch.tensor(losses(bf16, key)), torch.tensor(losses(fp32, key)), rtol=2e-2, atol=0)
    assert losses(bf16) != losses(fp32)  # bf16 did run: rounding shows
