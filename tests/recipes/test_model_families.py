"""A distillation run through `kdtune run` for each newer family (teacher and student of the same
family, random weights in the tiny world's vocabulary): Mistral and Phi-3 with sliding windows, Phi-3's
fused projections under LoRA, Gemma 2's softcaps, Gemma 3's local/global layers. The saved student
loads in transformers with the logits kdtune gives it."""

import pytest
import torch

from kdtune.checkpointing import load_model
from kdtune.training import read_metrics
from tests.cli_utils import run_kdtune
from tests.recipes.conftest import FAMILIES, family_world, kd_overrides


@pytest.mark.parametrize("family", FAMILIES)
def test_kd_run_for_each_family(world, tmp_path, family):
    dirs = family_world(world, family, tmp_path)
    out = tmp_path / "run"
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(dirs, out), "max_steps_per_epoch=3")
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
