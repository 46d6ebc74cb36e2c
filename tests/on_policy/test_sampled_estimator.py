"""The sampled-token reverse-KL estimator in the on-policy recipe: it moves the student towards the
teacher in reverse KL on held-out prompts (measured here from the definition), logs its estimate,
refuses a sampler its importance weights do not model; and lmbda follows its schedule."""

import pytest

import kdtune
from kdtune.datasets import prompt_dataset
from tests.cli_utils import assert_user_error, run_kdtune
from tests.on_policy.conftest import gkd_overrides
from tests.on_policy.test_recipe import CONFIG, RECIPE, greedy_log_probs, run_gkd

SAMPLED = ("on_policy_loss=sampled_reverse_kl", "lmbda=1.0", "generation.temperature=1.0")


def reverse_kl(student_dir, teacher, tok, prompts) -> float:
    """Mean KL(student || teacher) over the student's greedy completions of ``prompts``, in float64
    from its definition."""
    log_q, log_p = greedy_log_probs(student_dir, teacher, tok, prompts)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()


def test_the_sampled_estimator_moves_the_student_towards_the_teacher(world, chats, tmp_path):
    """One sampled token per position is a noisy gradient: at 4 prompts a step the student does not
    improve within 64 steps (measured), at 64 prompts a step (512 tokens) it does, in 24 steps."""
    out = tmp_path / "sampled"
    metrics = run_gkd(world, chats, out, *SAMPLED, "batch_size=64", "epochs=24", "optimizer.lr=0.001")
    assert len(metrics) == 24 and all("generated_length_mean" in m for m in metrics)  # lmbda 1: every step
    assert all(m["ce_loss"] == 0 and m["loss"] == m["kd_loss"] for m in metrics)  # the estimate is what is logged
    tok, teacher = kdtune.load_tokenizer(world["student"]), kdtune.load_model(world["teacher"])
    held_out = [s["prompt"] for s in prompt_dataset(tok, data_files=str(chats["held_out"]))]
    before, after = reverse_kl(world["student"], teacher, tok, held_out), reverse_kl(out / "epoch_24", teacher, tok,
                                                                                       held_out)
    print(f"held-out reverse KL {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before  # measured: 1.288 -> 1.166 (the full reverse-KL divergence: 1.095)


def test_teacher_written_completions_keep_the_divergence(world, chats, tmp_path):
    """seq_kd: the teacher writes the completions; the sampled estimator (whose weights assume the
    student sampled) is for the student's own, so these steps train exactly as without it."""
    args = ("lmbda=0.0", "seq_kd=true", "max_steps_per_epoch=3")
    plain = run_gkd(world, chats, tmp_path / "plain", *args)
    sampled = run_gkd(world, chats, tmp_path / "sampled", *args, "on_policy_loss=sampled_reverse_kl")
    assert [m["loss"] for m in sampled] == [m["loss"] for m in plain]


def test_lmbda_follows_its_schedule(world, chats, tmp_path):
    metrics = run_gkd(world, chats, tmp_path / "schedule", "lmbda=0.0", "lmbda_end=1.0", "max_steps_per_epoch=5")
    assert [m["lmbda"] for m in metrics] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert "generated_length_mean" not in metrics[0] and "generated_length_mean" in metrics[-1]


@pytest.mark.parametrize("sampler", ["generation.top_k=5", "generation.top_p=0.9", "generation.temperature=0"])
def test_a_sampler_the_weights_do_not_model_is_refused(world, chats, tmp_path, sampler):
    out = tmp_path / "refused"
    proc = run_kdtune("run", RECIPE, "--config", CONFIG, *gkd_overrides(world, chats, out), *SAMPLED, sampler)
    assert_user_error(proc, "generation: on_policy_loss=sampled_reverse_kl needs plain sampling")
    assert not out.exists()


def test_a_run_begun_before_a_setting_existed_resumes_at_its_default(world, chats, tmp_path):
    """A run whose config.yaml predates lmbda_end and on_policy_loss had their defaults: its resume
    with today's config (which spells the defaults out) is not a change of what defines the run."""
    out = tmp_path / "older"
    run_gkd(world, chats, out, "max_steps_per_epoch=2")
    recorded = out / "config.yaml"
    lines = recorded.read_text().splitlines()
    recorded.write_text("\n".join(line for line in lines if not line.startswith(("lmbda_end:", "on_policy_loss:"))))
    metrics = run_gkd(world, chats, out, "max_steps_per_epoch=2", "epochs=2", "resume_from_checkpoint=true")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    refused = run_kdtune("run", RECIPE, "--config", CONFIG, *gkd_overrides(world, chats, out), "max_steps_per_epoch=2",
                         "epochs=3", "resume_from_checkpoint=true", "on_policy_loss=sampled_reverse_kl")
    assert_user_error(refused, "on_policy_loss was")  # another value than the default is still a change
