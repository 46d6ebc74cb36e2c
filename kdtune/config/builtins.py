"""The built-in recipes and configs that ship inside the package.

`recipes/` and `configs/` at the top of the repository are installed as the packages
`kdtune.recipes` and `kdtune.configs`, so the same lookup works from a checkout, an editable
install and a wheel. A recipe is listed and runnable only once its file exists.
"""

import difflib
import runpy
import sys
from importlib import resources
from pathlib import Path

from kdtune.errors import KDTuneError

RECIPES = (
    "full_finetune_single_device",
    "lora_finetune_single_device",
    "lora_finetune_distributed",
    "knowledge_distillation_single_device",
    "knowledge_distillation_distributed",
    "on_policy_distillation_single_device",
    "on_policy_distillation_distributed",
    "cache_teacher_logits",
    "prune",
    "eleuther_eval",
    "generate",
)


def recipes_dir() -> Path:
    return Path(str(resources.files("kdtune.recipes")))


def configs_dir() -> Path:
    return Path(str(resources.files("kdtune.configs")))


def available_recipes() -> dict[str, Path]:
    """Recipe name -> script path, for the registered recipes whose file exists."""
    root = recipes_dir()
    return {name: root / f"{name}.py" for name in RECIPES if (root / f"{name}.py").is_file()}


def available_configs() -> dict[str, Path]:
    """Config name (``family/name`` without ``.yaml``) -> path."""
    root = configs_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def config_recipe(path: Path) -> str | None:
    """The recipe a built-in config is written for: its first line reads ``# Recipe: NAME``."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    prefix = "# Recipe:"
    return first[len(prefix):].strip() if first.startswith(prefix) else None


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def find_recipe(name_or_path: str) -> Path:
    """A built-in recipe name or a path to a ``.py`` script."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path)
        if not path.is_file():
            raise KDTuneError(f"recipe file '{name_or_path}' does not exist")
        return path
    recipes = available_recipes()
    if name_or_path not in recipes:
        raise KDTuneError(
            f"unknown recipe '{name_or_path}'{_suggest(name_or_path, recipes)} (see 'kdtune ls')"
        )
    return recipes[name_or_path]


def find_config(name_or_path: str) -> Path:
    """A built-in config name (``tiny/KD_single_device``) or a path to a ``.yaml`` file."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise KDTuneError(f"config file '{name_or_path}' does not exist")
        return path
    configs = available_configs()
    if name_or_path not in configs:
        raise KDTuneError(
            f"unknown config '{name_or_path}'{_suggest(name_or_path, configs)} (see 'kdtune ls')"
        )
    return configs[name_or_path]


def recipe_settings(name_or_path: str):
    """The settings class a recipe's ``main`` reads (``@kdtune.config.parse(SettingsClass)``): a built-in
    recipe's from the table, a script's found by importing it with its folder on the import path, as
    ``kdtune run`` does."""
    from kdtune.config.settings import RECIPE_SETTINGS

    if name_or_path in RECIPE_SETTINGS:
        return RECIPE_SETTINGS[name_or_path]
    script = find_recipe(name_or_path)
    sys.path.insert(0, str(script.resolve().parent))  # its own modules, and its components, import
    main = runpy.run_path(str(script), run_name="kdtune_recipe").get("main")  # __main__ guard: nothing runs
    settings = getattr(main, "settings", None)
    if settings is None:
        raise KDTuneError(f"recipe '{name_or_path}': its main() names no settings class; decorate it with "
                          f"@kdtune.config.parse(SettingsClass) so that its settings can be checked")
    return settings
