"""The README's walkthrough for real models: every `kdtune run` names a recipe and config that
exist, its overrides apply and its components validate, and every checkpoint a step reads is one an
earlier step downloads or writes."""

import re
import shlex

import pytest

from kdtune.config import load_config, validate
from kdtune.config.builtins import find_recipe
from tests.cli_utils import REPO

README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Distilling real models"):]
COMMANDS = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", SECTION, re.S)
            for line in block.splitlines() if line.startswith("kdtune ")]


def _run_parts(args):
    """(recipe, config, overrides) of `kdtune run [torchrun options] RECIPE --config CONFIG ...`."""
    i = args.index("--config")
    return args[i - 1], args[i + 1], args[i + 2:]


def test_the_walkthrough_is_there():
    kinds = [c[1] for c in COMMANDS]
    assert kinds.count("download") >= 4 and kinds.count("run") >= 8


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[1] == "run"], ids=lambda c: " ".join(c[2:5]))
def test_run_commands_validate(args):
    recipe, config, overrides = _run_parts(args)
    assert find_recipe(recipe).is_file()
    assert validate(load_config(config, overrides)) > 0


def test_each_step_reads_what_an_earlier_step_wrote():
    available = set()
    for args in COMMANDS:
        if args[1] == "download":
            available.add(args[args.index("--output-dir") + 1])
            continue
        _, config, overrides = _run_parts(args)
        cfg = load_config(config, overrides)
        reads = [cfg.get("checkpoint_dir"), cfg.get("checkpointer", {}).get("checkpoint_dir"),
                 cfg.get("teacher_checkpointer", {}).get("checkpoint_dir")]
        for path in filter(None, reads):
            assert path in available, f"{' '.join(args)} reads {path}, which no earlier command provides"
        if "checkpointer" in cfg:  # a training run: its final checkpoint is there for later steps
            available.add(f"{cfg.output_dir}/epoch_{cfg.epochs}")
        if _run_parts(args)[0] == "prune":  # the pruned checkpoint is output_dir itself
            available.add(cfg.output_dir)
