"""The entry point every recipe script uses: ``--config CONFIG [overrides]`` from its argv.

    @kdtune.config.parse(DistillationSettings)
    def main(cfg, s): ...

    if __name__ == "__main__":
        main()

The settings class names the keys the recipe reads (with their types and ranges); they are checked
before ``main`` runs and handed to it as ``s``. A copied recipe that reads a key of its own names a
subclass here (see kdtune/config/settings.py), and ``kdtune validate CONFIG --recipe my_kd.py``
checks a config against it. The bare form ``@kdtune.config.parse`` passes only ``cfg``.

The same script runs under ``kdtune run``, ``python recipe.py --config ...`` and torchrun; a user
error ends it with one ``kdtune: error:`` line and exit status 2.
"""

import argparse
import functools
import sys

from kdtune.config.loading import load_config
from kdtune.config.settings import read_settings
from kdtune.errors import stop_at_once_on_signals, user_errors


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error
        print(f"kdtune: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(settings=None):
    """Decorate a recipe's ``main``: ``@parse(SettingsClass)`` calls ``main(cfg, settings)``, ``@parse``
    calls ``main(cfg)``. The wrapper keeps the class as ``main.settings`` for ``kdtune validate``."""
    if callable(settings) and not isinstance(settings, type):  # the bare form: @parse
        return _wrap(settings, None)
    return lambda recipe_main: _wrap(recipe_main, settings)


def _wrap(recipe_main, settings_cls):
    @functools.wraps(recipe_main)
    def wrapper(argv: list[str] | None = None):
        stop_at_once_on_signals()  # under torchrun a recipe starts without the kdtune command
        parser = _Parser(prog=sys.argv[0], description=recipe_main.__doc__)
        parser.add_argument("--config", required=True, help="built-in config name or .yaml path")
        parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
        parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        with user_errors(args.debug):
            cfg = load_config(args.config, args.overrides)
            if settings_cls is None:
                return recipe_main(cfg)
            return recipe_main(cfg, read_settings(cfg, settings_cls))

    wrapper.settings = settings_cls
    return wrapper
