"""The one exception type for mistakes a user can fix, and the one way they are reported.

The CLI and every recipe print a user error as a single ``kdtune: error: ...`` line and exit with
status 2; a run stopped by SIGINT or SIGTERM prints one ``kdtune: stopped ...`` line and exits with
128 + the signal's number (130, 143); anything else is a bug and keeps its traceback.
"""

import contextlib
import os
import signal
import sys
import time


class KDTuneError(Exception):
    """A user error. The message names the key, file, value or row at fault."""


class RunStopped(BaseException):
    """A run stopped on a signal; ``str()`` says where, and which checkpoint a resume will use.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def debug_enabled() -> bool:
    return os.environ.get("KDTUNE_DEBUG", "") not in ("", "0")


OTHER_RANKS_WAIT_S = 5.0  # how long a rank other than 0 waits after a user error before exiting


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    """One ``kdtune: warning: ...`` line on stderr (once, from rank 0 under torchrun)."""
    if is_main_process():
        print(f"kdtune: warning: {message}", file=sys.stderr, flush=True)


def stop_at_once_on_signals() -> None:
    """Until a run installs its own handlers, SIGINT and SIGTERM end the process at once with one
    line: nothing is written before then, and an interrupt inside an import (torch takes seconds)
    would otherwise surface as an unrelated ImportError."""

    def stop(signum, frame):
        if is_main_process():
            print("kdtune: interrupted", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Turn a KDTuneError into one stderr line and exit status 2 (a traceback with ``--debug``),
    and a stop by signal (or Ctrl-C) into one line and exit status 128 + its number.

    Under torchrun only rank 0 prints, so a config error reads as one line, not one per process.
    """
    try:
        yield
    except KDTuneError as e:
        if debug or debug_enabled():
            raise
        if is_main_process():
            print(f"kdtune: error: {e}", file=sys.stderr, flush=True)
        else:  # torchrun reports the process that exits first and stops the rest: let rank 0 say it
            for signum in (signal.SIGINT, signal.SIGTERM):  # and be stopped quietly meanwhile
                signal.signal(signum, signal.SIG_DFL)
            time.sleep(OTHER_RANKS_WAIT_S)
        sys.exit(2)
    except RunStopped as e:
        if is_main_process():
            print(f"kdtune: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        if debug or debug_enabled():
            raise
        if is_main_process():
            print("kdtune: interrupted", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
