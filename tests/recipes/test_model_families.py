"""A distillation run through `kdtune run` for each newer family (teacher and student of the same
family, random weights in the tiny world's vocabulary): Mistral and Phi-3 with sliding windows, Phi-3's
fused projections under LoRA, Gemma 2's softcaps, Gemma 3's local/global layers. The saved student
loads in transformers with the logits kdtune gives it."""

import pytest
import torch

from kdtune.checkpointing import load_model
from kdtune.datasets import write_arithmetic_jsonl
from kdtune.training import read_metrics
from tests.cli_utils import run_kdtune
from tests.recipes.conftest import FAMILIES, family_world, kd_overrides


@pytest.mark.parametrize("family", FAMILIES)
def test_kd_run_for_each_family(world, tmp_path, family):
    dirs = family_world(world, family, tmp_path)
    out = tmp_path / "run"
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(dirs, out), "max_steps_per_epoch=3",
                      "dataset.max_seq_len=128")  # the tiny Phi-3 has 128 positions
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert len(metrics) == 3
    assert all(torch.isfinite(torch.tensor([m["loss"], m["ce_loss"], m["kd_loss"]])).all() for m in metrics)
    assert metrics[0]["kd_loss"] > 0
    step = out / "epoch_1"
    transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
    reference = transformers.AutoModelForCausalLM.from_pretrained(step, dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(step)(tokens), reference(tokens).logits, atol=1e-5, rtol=0)


def test_gemma2_on_policy_and_from_a_cache(world, tmp_path):
    """Gemma 2's caps on the other two teacher paths: on-policy GKD (the student samples from its
    capped logits) and KD from a teacher cache (top-k of the teacher's capped logits)."""
    dirs = family_world(world, "gemma2", tmp_path)
    chats = write_arithmetic_jsonl(tmp_path / "chats.jsonl", 16, seed=1, max_digits=2)
    gkd = run_kdtune("run", "on_policy_distillation_single_device", "--config", "tiny/GKD_single_device",
                     *kd_overrides(dirs, tmp_path / "gkd"), f"dataset.data_files={chats}", "max_steps_per_epoch=2")
    assert gkd.returncode == 0, gkd.stderr[-3000:]
    cache = run_kdtune("run", "cache_teacher_logits", "--config", "tiny/cache_teacher_logits",
                       f"output_dir={tmp_path / 'cache'}", f"teacher_checkpointer.checkpoint_dir={dirs['teacher']}",
                       f"tokenizer.path={dirs['student']}", f"dataset.data_files={dirs['data']}")
    assert cache.returncode == 0, cache.stderr[-3000:]
    kd = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                    *kd_overrides(dirs, tmp_path / "kd"), "~teacher_checkpointer",
                    f"+teacher_logits_cache={tmp_path / 'cache'}", "max_steps_per_epoch=2")
    assert kd.returncode == 0, kd.stderr[-3000:]
    for run in ("gkd", "kd"):
        metrics = read_metrics(tmp_path / run / "metrics.jsonl")
        assert len(metrics) == 2 and all(m["kd_loss"] > 0 for m in metrics)
