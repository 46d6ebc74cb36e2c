"""The entry point every recipe script uses: ``--config CONFIG [overrides]`` from its argv.

    @kdtune.config.parse
    def main(cfg): ...

    if __name__ == "__main__":
        main()

The same script runs under ``kdtune run``, ``python recipe.py --config ...`` and torchrun; a user
error ends it with one ``kdtune: error:`` line and exit status 2.
"""

import argparse
import functools
import sys

from kdtune.config.loading import load_config
from kdtune.errors import stop_at_once_on_signals, user_errors


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error
        print(f"kdtune: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(recipe_main):
    @functools.wraps(recipe_main)
    def wrapper(argv: list[str] | None = None):
        stop_at_once_on_signals()  # under torchrun a recipe starts without the kdtune command
        parser = _Parser(prog=sys.argv[0], description=recipe_main.__doc__)
        parser.add_argument("--config", required=True, help="built-in config name or .yaml path")
        parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
        parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        with user_errors(args.debug):
            return recipe_main(load_config(args.config, args.overrides))

    return wrapper
