import json
import os
import re

import pytest

from kdtune.config.builtins import RECIPES, available_configs, available_recipes, config_recipe
from tests.cli_utils import ASSETS, assert_user_error, run_kdtune

ECHO_RECIPE = ASSETS / "recipes" / "echo_recipe.py"
ECHO_CONFIG = ASSETS / "echo.yaml"


def test_every_builtin_config_names_a_registered_recipe():
    for name, path in available_configs().items():
        assert config_recipe(path) in RECIPES, f"{name}: first line must be '# Recipe: NAME'"


def test_ls_lists_recipes_with_their_configs():
    proc = run_kdtune("ls")
    assert proc.returncode == 0, proc.stderr
    for name in available_recipes():
        assert name in proc.stdout
    for cfg_name, path in available_configs().items():
        if config_recipe(path) in available_recipes():
            assert cfg_name in proc.stdout


def test_ls_components():
    proc = run_kdtune("ls", "--components")
    assert proc.returncode == 0 and "adamw" in proc.stdout and "torch.optim.AdamW" in proc.stdout


def test_cat_applies_overrides():
    proc = run_kdtune("cat", ECHO_CONFIG, "lr=0.25", "+extra=1")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.25" in proc.stdout and "extra: 1" in proc.stdout


def test_validate_good_and_bad(tmp_path):
    proc = run_kdtune("validate", ECHO_CONFIG)
    assert proc.returncode == 0 and "1 components resolve" in proc.stdout, proc.stderr
    assert_user_error(run_kdtune("validate", ECHO_CONFIG, "+optimizer.lrr=1"), "optimizer", "'lrr'")
    assert_user_error(run_kdtune("validate", ECHO_CONFIG, "optimizer=adamx"), "cannot resolve component 'adamx'")


def test_cp_copies_and_refuses_to_overwrite(tmp_path):
    names = list(available_recipes())[:1] + list(available_configs())[:1]  # the wheel test copies them all
    for i, name in enumerate(names):  # into a folder: the file keeps its name
        (tmp_path / str(i)).mkdir()
        proc = run_kdtune("cp", name, tmp_path / str(i))
        assert proc.returncode == 0, proc.stderr
    name = names[0]
    src = available_recipes().get(name) or available_configs()[name]
    dest = tmp_path / "0" / src.name
    assert dest.read_bytes() == src.read_bytes()
    dest.write_text("edited")
    assert_user_error(run_kdtune("cp", name, dest), "exists", "--force")
    assert dest.read_text() == "edited"  # nothing overwritten
    assert run_kdtune("cp", name, dest, "--force").returncode == 0
    assert dest.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("args, fragments", [
    (("cat", "no/such_config"), ("unknown config 'no/such_config'",)),
    (("cat", "missing.yaml"), ("config file 'missing.yaml' does not exist",)),
    (("cat", ECHO_CONFIG, "kd_ration=0.3"), ("no key 'kd_ration'",)),
    (("cat", ECHO_CONFIG, "lrr=0.3"), ("did you mean 'lr'",)),
    (("run", "no_such_recipe", "--config", ECHO_CONFIG), ("unknown recipe 'no_such_recipe'",)),
    (("run", ECHO_RECIPE, "--config", ECHO_CONFIG, "fail_with=boom"), ("boom",)),
    (("run", ECHO_RECIPE), ("--config",)),
    (("frobnicate",), ("invalid choice",)),
    (("cp", "no_such_thing", "x"), ("neither a built-in recipe nor a built-in config",)),
    (("plot", "/nonexistent/run"), ("metrics.jsonl",)),
])
def test_user_errors_are_one_line_with_status_2(args, fragments):
    assert_user_error(run_kdtune(*args), *fragments)


def test_debug_shows_the_traceback():
    proc = run_kdtune("--debug", "cat", "no/such_config")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = run_kdtune("cat", "no/such_config", env={"KDTUNE_DEBUG": "1"})
    assert "Traceback" in proc.stderr


def test_download_offline_is_a_clear_error(tmp_path):
    proc = run_kdtune("download", "Qwen/Qwen2-0.5B-Instruct", "--output-dir", tmp_path / "m",
                      env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret_value_123"})
    assert_user_error(proc, "Qwen/Qwen2-0.5B-Instruct")
    assert "hf_secret_value_123" not in proc.stderr + proc.stdout


def test_run_dispatches_in_process(tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    out = tmp_path / "out"
    proc = run_kdtune("run", ECHO_RECIPE, "--config", ECHO_CONFIG, f"output_dir={out}", "lr=0.5")
    assert proc.returncode == 0, proc.stderr
    got = json.loads((out / "rank0.json").read_text())
    assert got["config"]["optimizer"]["lr"] == 0.5 and "world_size" not in got
    assert got["thp"] == "1"  # huge pages for torch's large CPU tensors, unless the user says otherwise


def test_run_keeps_the_users_huge_page_setting(tmp_path):
    out = tmp_path / "out"
    proc = run_kdtune("run", ECHO_RECIPE, "--config", ECHO_CONFIG, f"output_dir={out}",
                      env={"THP_MEM_ALLOC_ENABLE": "0"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "rank0.json").read_text())["thp"] == "0"


def test_run_dispatches_through_torchrun(tmp_path):
    out = tmp_path / "out"
    proc = run_kdtune("run", "--nproc_per_node", "2", "--standalone", ECHO_RECIPE, "--config", ECHO_CONFIG,
                      f"output_dir={out}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        got = json.loads((out / f"rank{rank}.json").read_text())
        assert got["world_size"] == 2 and got["rank_sum"] == 1.0
        assert got["thp"] == os.environ.get("THP_MEM_ALLOC_ENABLE", "1")  # the workers inherit kdtune's setting
        assert got["config"]["output_dir"] == str(out)


def test_run_user_error_under_torchrun_is_one_line(tmp_path):
    proc = run_kdtune("run", "--nproc_per_node", "2", "--standalone", ECHO_RECIPE, "--config", ECHO_CONFIG,
                      f"output_dir={tmp_path}", "fail_with=bad_value", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdtune: error:")]
    assert errors == ["kdtune: error: bad_value"] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(available_configs()))
def test_every_builtin_config_validates(name):
    from kdtune.config import load_config, validate

    assert validate(load_config(name)) > 0


def test_every_setting_of_a_built_in_config_is_documented_above_it():
    from kdtune.config.builtins import available_configs

    for name, path in available_configs().items():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^[a-z_]+:", line):
                assert i > 0 and lines[i - 1].startswith("# "), f"{name}: '{line}' has no comment above it"


def test_validate_reports_the_settings_errors_a_run_would():
    proc = run_kdtune("validate", "tiny/KD_single_device", "batch_size=2.5")
    assert_user_error(proc, "batch_size", "positive integer", "2.5")
    proc = run_kdtune("validate", "tiny/KD_single_device", "+kd_ratioo=0.5")
    assert_user_error(proc, "kd_ratioo", "did you mean 'kd_ratio'")
