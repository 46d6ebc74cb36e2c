"""``kdtune run [torchrun options] RECIPE --config CONFIG [overrides]``.

Without torchrun options the recipe runs in this process, as if started with ``python``. With any
(``--nproc_per_node 2``, ``--nnodes``, ``--rdzv_endpoint`` ...) it launches through
``torch.distributed.run``, which understands exactly torchrun's own options.
"""

import logging
import os
import runpy
import sys
from pathlib import Path

from kdtune.config.builtins import find_config, find_recipe
from kdtune.errors import KDTuneError


def split_run_args(argv: list[str]):
    """(torchrun argv, recipe, recipe argv): the recipe is torchrun's positional ``training_script``."""
    from torch.distributed.run import get_args_parser

    def fail(message):
        raise KDTuneError(f"run: {message}")

    parser = get_args_parser()
    parser.error = fail
    ns = parser.parse_args(argv)
    recipe = ns.training_script
    launcher_argv = argv[: len(argv) - len(ns.training_script_args) - 1]
    return launcher_argv, recipe, list(ns.training_script_args)


def _config_arg(recipe_argv: list[str]) -> list[str]:
    """Replace a built-in config name by its path, so the recipe process needs no lookup."""
    out = list(recipe_argv)
    for i, tok in enumerate(out):
        if tok == "--config" and i + 1 < len(out):
            out[i + 1] = str(find_config(out[i + 1]))
        elif tok.startswith("--config="):
            out[i] = "--config=" + str(find_config(tok.split("=", 1)[1]))
    if not any(t == "--config" or t.startswith("--config=") for t in out):
        raise KDTuneError("run: --config CONFIG is required after the recipe")
    return out


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0].strip("`. "))
        return 0 if argv else 2
    launcher_argv, recipe, recipe_argv = split_run_args(argv)
    script = str(find_recipe(recipe))
    recipe_argv = _config_arg(recipe_argv)
    if not launcher_argv:
        sys.argv = [script, *recipe_argv]
        # as `python my_kd.py` does: modules beside a copied recipe import, in it and as _component_
        sys.path.insert(0, str(Path(script).resolve().parent))
        runpy.run_path(script, run_name="__main__")
        return 0

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    # torchrun's agent logs every worker's exit and the signals it sends the others: a user error
    # stays one line, and a crash is reported by the ChildFailedError below (LOGLEVEL=INFO shows all).
    logging.getLogger("torch.distributed.elastic").setLevel(os.environ.get("LOGLEVEL", "CRITICAL"))
    args = get_args_parser().parse_args([*launcher_argv, script, *recipe_argv])
    try:
        torchrun(args)
    except ChildFailedError as e:
        # The first rank to fail decides: the agent stops the others as soon as one exits.
        if e.get_first_failure()[1].exitcode == 2:  # a user error, already printed as one line by rank 0
            return 2
        raise
    return 0
