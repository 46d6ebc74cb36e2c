"""The distributed recipes on 2 CPU processes (gloo, FSDP2) against the single-device recipe on the
same global batches: per-rank batch_size 2 on 2 ranks sees what batch_size 4 sees on one device."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import kdtune
from kdtune.checkpointing import ADAPTER_SUBDIR, write_random_checkpoint
from kdtune.training import read_metrics
from kdtune.training.models import LORA_KEYS
from tests.cli_utils import assert_user_error, run_kdtune
from tests.recipes.conftest import family_world, kd_overrides, tiny_config

TORCHRUN = ("--nproc_per_node", "2", "--standalone")
ENV = {"OMP_NUM_THREADS": "1"}  # else torchrun sets it and says so on stderr
FULL_STUDENT = tuple(f"~model.{k}" for k in LORA_KEYS) + ("optimizer.lr=0.001",)
RUN = ("epochs=2", "max_steps_per_epoch=3", "save_every_n_steps=2")  # saves step_2, epoch_1, step_4, epoch_2
METRICS = ("loss", "ce_loss", "kd_loss", "grad_norm")


def run_kd(world, out, *extra, distributed=True, expect=0):
    if distributed:
        launch = (*TORCHRUN, "knowledge_distillation_distributed", "--config", "tiny/KD_distributed", "batch_size=2")
    else:
        launch = ("knowledge_distillation_single_device", "--config", "tiny/KD_single_device", "batch_size=4")
    proc = run_kdtune("run", *launch, *kd_overrides(world, out), *extra, env=ENV)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc if expect else metrics_by_step(out)


def metrics_by_step(out):
    last = {m["step"]: m for m in read_metrics(out / "metrics.jsonl")}  # a resumed run's repeated step: the later
    return [[last[s][k] for k in METRICS] for s in sorted(last)]


def assert_same_weights(a, b, tol):
    x, y = kdtune.load_model(a).state_dict(), kdtune.load_model(b).state_dict()
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], atol=tol, rtol=tol, msg=name)


def cut_after(src, dst, step):
    """What a run killed right after its step-``step`` checkpoint leaves on disk (it had logged one more step)."""
    shutil.copytree(src, dst)
    for later in [p for p in dst.iterdir() if p.is_dir()]:
        if int(later.name.split("_")[1]) * (3 if later.name.startswith("epoch") else 1) > step:
            shutil.rmtree(later)
    lines = (dst / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[: step + 1]))


@pytest.mark.parametrize("student", ["lora", "full"])
def test_kd_matches_single_device_and_resumes(student, world, tmp_path):
    extra = (*RUN, *(FULL_STUDENT if student == "full" else ()))
    single = run_kd(world, tmp_path / "single", *extra, distributed=False)
    whole = run_kd(world, tmp_path / "whole", *extra)
    assert len(whole) == 6
    torch.testing.assert_close(torch.tensor(whole), torch.tensor(single), rtol=1e-5, atol=0)
    assert_same_weights(tmp_path / "whole" / "epoch_2", tmp_path / "single" / "epoch_2", 1e-5)
    if student == "lora":
        adapters = [load_file(tmp_path / run / "epoch_2" / ADAPTER_SUBDIR / "adapter_model.safetensors")
                    for run in ("whole", "single")]
        assert adapters[0].keys() == adapters[1].keys()
        for name in adapters[0]:
            torch.testing.assert_close(adapters[0][name], adapters[1][name], atol=1e-5, rtol=1e-5, msg=name)
    assert (tmp_path / "whole" / "step_4" / "optimizer" / ".metadata").is_file()

    cut_after(tmp_path / "whole", tmp_path / "cut", 4)
    resumed = run_kd(world, tmp_path / "cut", *extra, "resume_from_checkpoint=true")
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=1e-6, atol=0)
    assert_same_weights(tmp_path / "whole" / "epoch_2", tmp_path / "cut" / "epoch_2", 1e-6)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_kd_of_softcapped_and_fused_families_matches_single_device(family, world, tmp_path):
    """Gemma 2 (softcaps, sliding windows) and Phi-3 (LoRA on the fused qkv_proj/gate_up_proj) sharded
    over two processes follow the single-device run."""
    models = family_world(world, family, tmp_path / "models")
    steps = ("max_steps_per_epoch=2", "dataset.max_seq_len=128")  # the tiny Phi-3 has 128 positions
    single = run_kd(models, tmp_path / "single", *steps, distributed=False)
    sharded = run_kd(models, tmp_path / "sharded", *steps)
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(single), rtol=1e-5, atol=0)


def test_qlora_finetune_shards_nf4_weights_whose_blocks_divide(world, tmp_path):
    # 128-wide MLP projections hold 512 NF4 blocks of 64 weights: two 256-block scaler groups, one per rank.
    wide = write_random_checkpoint(tiny_config(2, 128, 4, 2), tmp_path / "wide")
    for f in world["tokenizer"].iterdir():
        shutil.copy(f, wide / f.name)
    qlora = (f"checkpointer.checkpoint_dir={wide}", f"dataset.data_files={world['data']}",
             "model.quantize_base=true", "model.lora_attn_modules=[]", "max_steps_per_epoch=2")
    for recipe, launch in (("single", ("lora_finetune_single_device", "batch_size=4")),
                           ("sharded", (*TORCHRUN, "lora_finetune_distributed", "batch_size=2"))):
        proc = run_kdtune("run", *launch[:-1], "--config", "tiny/lora_finetune_single_device", launch[-1],
                          f"output_dir={tmp_path / recipe}", *qlora, env=ENV)
        assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [[m["loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl")] for run in ("sharded", "single")]
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    assert_same_weights(tmp_path / "sharded" / "epoch_1", tmp_path / "single" / "epoch_1", 1e-5)


def test_nf4_weights_that_do_not_divide_are_a_user_error(world, tmp_path):
    # The 64-wide student's q_proj has 64 NF4 blocks: a single scaler group, which 2 ranks cannot split.
    proc = run_kd(world, tmp_path / "bad", "model.quantize_base=true", expect=2)
    # Importing torchao logs warnings of its own in this environment; everything else is one line.
    proc.stderr = "".join(line for line in proc.stderr.splitlines(keepends=True)
                          if "torchao" not in line and "_pytree.py" not in line)
    assert_user_error(proc, "layers.0.self_attn.q_proj.weight", "[64, 64]", "2 processes")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()

