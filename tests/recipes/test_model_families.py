"""A distillation run through `kdtune run` for each newer family (teacher and student of the same
family, random weights in the tiny world's vocabulary): Mistral and Phi-3 with sliding windows, Phi-3's
fused projections under LoRA, Gemma 2's softcaps, Gemma 3's local/global layers. The saved student
loads in transformers with the logits kdtune gives it."""

import shutil

import pytest
import torch

from kdtune.checkpointing import load_model, write_random_checkpoint
from kdtune.training import read_metrics
from tests.cli_utils import run_kdtune
from tests.models.tiny import CONFIGS
from tests.recipes.conftest import VOCAB, kd_overrides

FAMILIES = ["mistral", "phi3", "gemma2", "gemma3_text"]


def family_world(world, family, root):
    """The world with its student and teacher replaced by ``family`` models of the tokenizer's width."""
    dirs = dict(world)
    for name, layers, seed in (("student", 2, 0), ("teacher", 3, 1)):
        config = dict(CONFIGS[family], vocab_size=VOCAB, num_hidden_layers=layers, initializer_range=0.1)
        config.pop("layer_types", None)  # the family's own pattern for this depth
        dirs[name] = write_random_checkpoint(config, root / name, seed=seed)
        for f in world["tokenizer"].iterdir():
            shutil.copy(f, dirs[name] / f.name)
    return dirs


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
