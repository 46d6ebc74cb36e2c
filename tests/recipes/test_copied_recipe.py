"""A copied recipe is a first-class recipe: a module beside it imports (in it and as a component), a
setting it declares is read, validated and refused out of range, a kd_loss that is not a divergence
is one line, every training run says what it trains, a resume with another recipe file is refused,
a step redone after a kill is logged once, and validation scores at the step's own temperature."""

import re
import shutil

import pytest
import torch

import kdtune
from kdtune.datasets import alpaca_dataset
from kdtune.training import read_metrics
from tests.cli_utils import REPO, assert_user_error, run_kdtune
from tests.recipes.conftest import kd_overrides
from tests.recipes.test_readme_edits import by_step, edited_recipe

README = (REPO / "README.md").read_text()
MY_LOSSES = re.search(r"<!-- file: my_losses.py -->\n```python\n(.*?)```", README, re.S).group(1)
ENV = {"OMP_NUM_THREADS": "1"}
FULL, LORA = "tiny/KD_full_single_device", "tiny/KD_single_device"


@pytest.fixture
def copied(tmp_path):
    """The README's own_setting edit on a `kdtune cp` copy in its own folder, `my_losses.py` beside it,
    and the copy importing it by name (as a user's recipe would)."""
    folder = tmp_path / "my_recipes"
    folder.mkdir()
    recipe = edited_recipe("own_setting", folder)
    text = open(recipe).read()
    (folder / "own_setting.py").write_text(text.replace("import torch\n", "import my_losses  # noqa: F401\nimport torch\n", 1))
    (folder / "my_losses.py").write_text(MY_LOSSES)
    return recipe


def hellinger(world, samples: int) -> float:
    """Mean squared Hellinger distance between teacher and student over the trained tokens of the
    first ``samples`` samples, in float64 from its definition."""
    tok = kdtune.load_tokenizer(world["student"])
    student, teacher = kdtune.load_model(world["student"]), kdtune.load_model(world["teacher"])
    total = count = 0.0
    for sample in list(alpaca_dataset(tok, data_files=str(world["data"]), max_seq_len=256))[:samples]:
        tokens, labels = torch.tensor([sample["tokens"]]), torch.tensor(sample["labels"])
        keep = labels != -100
        with torch.no_grad():
            q = student(tokens)[0, keep, : tok.vocab_size].double().softmax(-1)
            p = teacher(tokens)[0, keep, : tok.vocab_size].double().softmax(-1)
        total += (1 - (p * q).sqrt().sum(-1)).sum().item()
        count += int(keep.sum())
    return total / count


def test_a_module_beside_a_copied_recipe_imports_and_its_divergence_trains(world, copied, tmp_path):
    out = tmp_path / "run"
    proc = run_kdtune("run", copied, "--config", FULL, *kd_overrides(world, out), "kd_loss=my_losses.HellingerLoss",
                      "+kd_warmup_steps=2", "kd_ratio=1.0", "max_steps_per_epoch=3", "shuffle=false",
                      cwd=tmp_path, env=ENV)  # run from another folder: the recipe's own is what counts
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert by_step(metrics, "kd_ratio") == pytest.approx([0.5, 1.0, 1.0])  # the copy's own setting at work
    assert metrics[0]["kd_loss"] == pytest.approx(hellinger(world, 4), rel=1e-5)  # step 1: the initial student


def test_a_component_that_does_not_resolve_says_where_it_looked(world, copied, tmp_path):
    out = tmp_path / "run"
    proc = run_kdtune("run", copied, "--config", FULL, *kd_overrides(world, out), "kd_loss=my_lossez.HellingerLoss",
                      cwd=tmp_path, env=ENV)
    assert_user_error(proc, "kd_loss._component_: cannot resolve component 'my_lossez.HellingerLoss'",
                      f"no module 'my_lossez' in {tmp_path / 'my_recipes'}")
    assert not out.exists()


def test_validate_checks_a_config_against_the_copied_recipe(world, copied, tmp_path):
    ok = run_kdtune("validate", FULL, "--recipe", copied, "+kd_warmup_steps=20", "kd_loss=my_losses.HellingerLoss",
                    cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "its settings are what" in ok.stdout
    assert_user_error(run_kdtune("validate", FULL, "--recipe", copied, "+kd_warmup_steps=-1", cwd=tmp_path),
                      "kd_warmup_steps: expected a non-negative integer, got -1")
    # the built-in recipe reads no such key, and says so before anything is written
    assert_user_error(run_kdtune("validate", FULL, "+kd_warmup_steps=20"),
                      "kd_warmup_steps: not a setting this recipe reads")
    out = tmp_path / "builtin"
    assert_user_error(run_kdtune("run", "knowledge_distillation_single_device", "--config", FULL,
                                 *kd_overrides(world, out), "+kd_warmup_steps=20", env=ENV),
                      "kd_warmup_steps: not a setting this recipe reads")
    assert not out.exists()


def test_a_kd_loss_that_is_not_a_divergence_is_one_line(world, tmp_path):
    out = tmp_path / "run"
    for component, args in (("kdtune.losses.CrossEntropyLoss", ("validate", FULL)),
                            ("torch.nn.KLDivLoss", ("validate", FULL)),
                            ("torch.nn.KLDivLoss", ("run", "knowledge_distillation_single_device", "--config", FULL,
                                                    *kd_overrides(world, out)))):
        assert_user_error(run_kdtune(*args, f"kd_loss={component}", env=ENV), f"kd_loss: '{component}' is not a "
                          f"divergence", "subclass kdtune.losses.Divergence", "per_token(log_q, log_p)")
    assert not out.exists()


def test_every_training_run_says_what_it_trains_without_a_terminal(world, tmp_path):
    total = sum(p.numel() for p in kdtune.load_model(world["student"]).parameters())
    full = run_kdtune("run", "knowledge_distillation_single_device", "--config", FULL,
                      *kd_overrides(world, tmp_path / "full"), "max_steps_per_epoch=1", env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    assert f"trainable parameters: {total:,} of {total:,} (100.00%): every weight (full fine-tuning)" in full.stdout
    lora = run_kdtune("run", "knowledge_distillation_single_device", "--config", LORA,
                      *kd_overrides(world, tmp_path / "lora"), "max_steps_per_epoch=1", env=ENV)
    assert lora.returncode == 0, lora.stderr[-3000:]
    line = next(line for line in lora.stdout.splitlines() if line.startswith("trainable parameters: "))
    assert line.endswith("LoRA rank 8 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
                         "(14 projections)"), line


def test_a_lora_option_without_a_rank_is_refused(world, tmp_path):
    out = tmp_path / "run"
    assert_user_error(run_kdtune("run", "knowledge_distillation_single_device", "--config", FULL,
                                 *kd_overrides(world, out), "+model.apply_lora_to_mlp=false", env=ENV),
                      "model.apply_lora_to_mlp: a LoRA option, but model.lora_rank is not set")
    assert_user_error(run_kdtune("validate", FULL, "+model.apply_lora_to_mlp=false"), "model.lora_rank is not set")
    assert_user_error(run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                                 f"output_dir={out}", f"checkpointer.checkpoint_dir={world['student']}",
                                 f"dataset.data_files={world['data']}", "+model.lora_rank=8", env=ENV),
                      "this recipe trains every weight; use lora_finetune_single_device")
    assert not out.exists()


def test_resume_with_another_recipe_file_is_refused(world, copied, tmp_path):
    out = tmp_path / "run"
    args = (*kd_overrides(world, out), "max_steps_per_epoch=2")
    first = run_kdtune("run", copied, "--config", LORA, *args, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    resume = (*args, "epochs=2", "resume_from_checkpoint=true")
    assert_user_error(run_kdtune("run", "knowledge_distillation_single_device", "--config", LORA, *resume, env=ENV),
                      "resume_from_checkpoint: the recipe was own_setting.py (sha256 ",
                      "is knowledge_distillation_single_device.py (sha256 ", "resume_allow_changes=[recipe]")
    # allowed, a recipe whose optimizer has other parameter groups still cannot load the checkpoint's
    lora_plus = edited_recipe("lora_plus", tmp_path)
    assert_user_error(run_kdtune("run", lora_plus, "--config", LORA, *resume, "resume_allow_changes=[recipe]",
                                 env=ENV),
                      "holds a 'optimizer' that does not fit this run's", "the recipe's parameter groups")
    assert not (out / "epoch_2").exists()
    again = run_kdtune("run", copied, "--config", LORA, *resume, env=ENV)  # the same file resumes
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_step_redone_after_a_kill_is_logged_once(world, tmp_path):
    out = tmp_path / "run"
    args = ("knowledge_distillation_single_device", "--config", FULL, *kd_overrides(world, out),
            "max_steps_per_epoch=4", "save_every_n_steps=2")
    assert run_kdtune("run", *args, env=ENV).returncode == 0
    whole = read_metrics(out / "metrics.jsonl")
    # as if killed after logging steps 3 and 4 but before the epoch's checkpoint was written
    shutil.rmtree(out / "epoch_1")
    assert run_kdtune("run", *args, "resume_from_checkpoint=true", env=ENV).returncode == 0
    resumed = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for key in ("loss", "ce_loss", "kd_loss"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in whole], rel=1e-6), key


def test_validation_scores_at_the_temperature_the_loop_sets(world, tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    recipe = folder / "temperature.py"
    assert run_kdtune("cp", "knowledge_distillation_single_device", recipe).returncode == 0
    text = recipe.read_text()
    line = "            temperature = kd.divergence.temperature"
    assert text.count(line) == 1
    recipe.write_text(text.replace(line, "            temperature = 4.0  #"))
    out = tmp_path / "run"
    # one step over all 64 samples at learning rate 0 (the warmup's first step), validated on the same samples
    proc = run_kdtune("run", recipe, "--config", FULL, *kd_overrides(world, out), "batch_size=64", "shuffle=false",
                      "max_steps_per_epoch=1", "+validation.every_n_steps=1", "+validation.dataset._component_=alpaca",
                      f"+validation.dataset.data_files={world['data']}", "+validation.dataset.max_seq_len=256", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (step,) = read_metrics(out / "metrics.jsonl")
    assert step["lr"] == 0.0
    assert step["val_kd_loss"] == pytest.approx(step["kd_loss"], rel=1e-5)
    assert step["val_ce_loss"] == pytest.approx(step["ce_loss"], rel=1e-5)
