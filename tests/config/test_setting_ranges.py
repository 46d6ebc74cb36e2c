"""Every setting has a type and a range, checked before anything loads: a walk over every built-in
recipe's settings (nested ones included) and every component argument that declares a range tries
values just outside each, and each is refused with exit status 2, one line naming the key, and
nothing written."""

import runpy
from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from kdtune.config import validate
from kdtune.config.builtins import RECIPES, find_config, find_recipe, recipe_settings
from kdtune.config.registry import COMPONENTS
from kdtune.config.instantiate import resolve_component
from kdtune.config.settings import RECIPE_SETTINGS
from kdtune.errors import KDTuneError
from tests.recipes.test_bad_input import run_in_process

CONFIG = {"full_finetune_single_device": "tiny/full_finetune_single_device",
          "lora_finetune_single_device": "tiny/lora_finetune_single_device",
          "lora_finetune_distributed": "tiny/lora_finetune_single_device",
          "knowledge_distillation_single_device": "tiny/KD_single_device",
          "knowledge_distillation_distributed": "tiny/KD_distributed",
          "on_policy_distillation_single_device": "tiny/GKD_single_device",
          "on_policy_distillation_distributed": "tiny/GKD_distributed",
          "cache_teacher_logits": "tiny/cache_teacher_logits", "generate": "tiny/generate",
          "eleuther_eval": "tiny/eval", "prune": "tiny/prune"}
VALIDATION = {"validation.dataset": "{_component_: alpaca, data_files: x.json}", "validation.every_n_steps": "2"}
SERVER = {"base_url": "http://127.0.0.1:9/v1", "model": "t"}  # the required keys of a served model's node


def walk(cls, prefix=""):
    """(key, check) of every field of ``cls`` with a check, nested settings walked too."""
    for f in fields(cls):
        check = f.metadata.get("check")
        if check is None:
            continue
        yield prefix + f.name, check
        if hasattr(check, "settings"):
            yield from walk(check.settings, f"{prefix}{f.name}.")


CASES = [(recipe, key, value) for recipe in RECIPES for key, check in walk(recipe_settings(recipe))
         for value in check.outside]


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_settings_table_is_what_each_recipe_reads(recipe):
    main = runpy.run_path(str(find_recipe(recipe)), run_name="kdtune_recipe")["main"]
    assert main.settings is RECIPE_SETTINGS[recipe]


def test_the_walk_covers_every_recipe_and_every_kind_of_range():
    assert {recipe for recipe, _, _ in CASES} == set(RECIPES)
    assert len(CASES) > 150
    keys = {key for _, key, _ in CASES}
    assert {"batch_size", "kd_ratio", "generation.top_p", "validation.every_n_steps", "top_k", "num_layers"} <= keys


def override(cfg, key: str, value) -> str:
    shown = "''" if value == "" else OmegaConf.to_yaml(OmegaConf.create({"v": value})).strip()[3:]
    absent = OmegaConf.select(cfg, key, default=KeyError) is KeyError
    return f"{'+' if absent else ''}{key}={shown}"


@pytest.mark.parametrize("recipe, key, value", CASES, ids=[f"{r}:{k}={v!r}" for r, k, v in CASES])
def test_a_value_just_outside_the_range_is_one_line(recipe, key, value, tmp_path, capsys):
    config = CONFIG[recipe]
    cfg = OmegaConf.load(find_config(config))
    argv = ["--config", config, f"output_dir={tmp_path / 'out'}"]
    if key.startswith("validation.") and key != "validation.dataset" or key == "validation.every_n_steps":
        argv += [f"+{k}={v}" for k, v in VALIDATION.items() if k != key]
    node, _, name = key.partition(".")
    if node in ("teacher_server", "student_server"):
        argv += [f"+{node}.{k}={v}" for k, v in SERVER.items() if k != name]
    argv.append(override(cfg, key, value))
    code, err = run_in_process(recipe, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"kdtune: error: {key}: "), lines[0]
    assert not (tmp_path / "out").exists()


ARGUMENTS = [(name, arg, value) for name in sorted(COMPONENTS)
             for arg, check in getattr(resolve_component(name), "argument_checks", {}).items()
             for value in check.outside]


def test_components_declare_the_ranges_of_their_arguments():
    declared = {name for name, _, _ in ARGUMENTS}
    assert {"alpaca", "chat", "text_completion", "prompts", "arithmetic", "tokenizer", "cosine_with_warmup"} <= declared


@pytest.mark.parametrize("name, arg, value", ARGUMENTS, ids=[f"{n}.{a}={v!r}" for n, a, v in ARGUMENTS])
def test_a_component_argument_outside_its_range_is_one_line(name, arg, value):
    cfg = OmegaConf.create({"node": {"_component_": name, arg: value}})
    with pytest.raises(KDTuneError, match=rf"^node\.{arg}: expected "):
        validate(cfg)
