"""The one exception type for mistakes a user can fix, and the one way they are reported.

The CLI and every recipe print a user error as a single ``kdtune: error: ...`` line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

import contextlib
import os
import sys


class KDTuneError(Exception):
    """A user error. The message names the key, file, value or row at fault."""


def debug_enabled() -> bool:
    return os.environ.get("KDTUNE_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Turn a KDTuneError into one stderr line and exit status 2 (a traceback with ``--debug``).

    Under torchrun only rank 0 prints, so a config error reads as one line, not one per process.
    """
    try:
        yield
    except KDTuneError as e:
        if debug or debug_enabled():
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"kdtune: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
