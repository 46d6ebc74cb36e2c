"""The on-policy distillation recipe end to end through `kdtune run` on tiny checkpoints."""

import shutil

import pytest
import torch

import kdtune
from kdtune.datasets import IGNORE_INDEX, prompt_dataset
from kdtune.generation import generate
from kdtune.training import read_metrics
from kdtune.training.on_policy import completion_batch
from tests.cli_utils import assert_user_error, run_kdtune
from tests.on_policy.conftest import gkd_overrides

RECIPE, CONFIG = "on_policy_distillation_single_device", "tiny/GKD_single_device"
LORA = ("+model.lora_rank=4", "+model.lora_alpha=8")


def run_gkd(world, chats, out, *extra):
    proc = run_kdtune("run", RECIPE, "--config", CONFIG, *gkd_overrides(world, chats, out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def greedy_log_probs(student_dir, teacher, tok, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's float64 next-token log-probabilities over the student's own
    greedy completions of ``prompts`` (completion positions only)."""
    student = kdtune.load_model(student_dir)
    out = generate(student, prompts, max_new_tokens=8, stop_ids=tok.eos_ids, pad_id=tok.pad_id,
                   vocab_size=tok.vocab_size)
    batch = completion_batch(prompts, out.completions, stop_ids=tok.eos_ids, pad_id=tok.pad_id)
    scored = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        log_q = student(batch["tokens"])[scored][:, : tok.vocab_size].double().log_softmax(-1)
        log_p = teacher(batch["tokens"])[scored][:, : tok.vocab_size].double().log_softmax(-1)
    return log_q, log_p


def divergences(student_dir, teacher, tok, prompts) -> tuple[float, float]:
    """Mean generalized JSD (beta 0.5) and forward KL(teacher || student) over the student's greedy
    completions of ``prompts``, written out here from their definitions."""
    log_q, log_p = greedy_log_probs(student_dir, teacher, tok, prompts)
    p, q = log_p.exp(), log_q.exp()
    log_m = (0.5 * p + 0.5 * q).log()
    jsd = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
    forward_kl = (p * (log_p - log_q)).sum(-1)
    return jsd.mean().item(), forward_kl.mean().item()


def test_student_moves_towards_the_teacher_on_held_out_prompts(world, chats, tmp_path):
    out = tmp_path / "gkd"
    metrics = run_gkd(world, chats, out)  # a full student, 16 steps
    assert len(metrics) == 16
    assert {"loss", "kd_loss", "lr", "tokens_per_second", "on_policy_fraction"} <= set(metrics[0])
    generating = [m for m in metrics if "generated_length_mean" in m]
    assert 0 < len(generating) < len(metrics)  # lmbda 0.5: some steps on-policy, some on the dataset's replies
    assert all(m["generation_tokens_per_second"] > 0 for m in generating)
    fraction = metrics[-1]["on_policy_fraction"]
    assert fraction == pytest.approx(len(generating) / len(metrics))
    tok, teacher = kdtune.load_tokenizer(world["student"]), kdtune.load_model(world["teacher"])
    held_out = [s["prompt"] for s in prompt_dataset(tok, data_files=str(chats["held_out"]))]
    jsd_before, kl_before = divergences(world["student"], teacher, tok, held_out)
    jsd_after, kl_after = divergences(out / "epoch_1", teacher, tok, held_out)
    print(f"held-out GJSD {jsd_before:.4f} -> {jsd_after:.4f}, forward KL {kl_before:.4f} -> {kl_after:.4f}")
    assert jsd_after < 0.9 * jsd_before and kl_after < 0.9 * kl_before


def test_resume_reproduces_the_uninterrupted_run(world, chats, tmp_path):
    args = ("max_steps_per_epoch=6", "save_every_n_steps=3", "loss_form=chunked", "kd_ratio=0.25", *LORA)
    whole = run_gkd(world, chats, tmp_path / "whole", *args)
    # Generated completions are scored by the divergence alone, the dataset's replies by the kd_ratio mix.
    generated = ["generated_length_mean" in m for m in whole]
    assert any(generated) and not all(generated)
    for m, gen in zip(whole, generated):
        want = m["kd_loss"] if gen else 0.75 * m["ce_loss"] + 0.25 * m["kd_loss"]
        assert m["loss"] == pytest.approx(want, rel=1e-5)
    cut = tmp_path / "cut"  # killed right after its step-3 checkpoint
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "epoch_1")
    (cut / "metrics.jsonl").write_text("".join((cut / "metrics.jsonl").read_text().splitlines(True)[:3]))
    resumed = run_gkd(world, chats, cut, *args, "resume_from_checkpoint=true")
    keys = ("loss", "kd_loss", "on_policy_fraction", "generated_length_mean")
    for key in keys:
        assert [m.get(key) for m in resumed] == pytest.approx([m.get(key) for m in whole]), key


def test_prompt_only_data_needs_generated_completions(world, chats, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {i} + {i}?"}}\n' for i in range(8)))
    overrides = (*gkd_overrides(world, chats, tmp_path / "bad"), f"dataset.data_files={data}")
    proc = run_kdtune("run", RECIPE, "--config", CONFIG, *overrides, "lmbda=0.5")
    assert_user_error(proc, "lmbda", "no reference reply")
    # A QLoRA student learning from replies the teacher writes.
    metrics = run_gkd(world, chats, tmp_path / "ok", f"dataset.data_files={data}", "lmbda=0.0", "seq_kd=true",
                      *LORA, "+model.quantize_base=true", "max_steps_per_epoch=2")
    assert [m["on_policy_fraction"] for m in metrics] == [0.0, 0.0] and "generated_length_mean" in metrics[0]
