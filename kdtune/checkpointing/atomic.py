"""Folders that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdtune.errors import KDTuneError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; when the block succeeds, flush it to disk
    and rename it to ``final`` in one step.

    A crash or an exception leaves no ``final`` (only, after a hard crash, a ``.name.tmp*`` folder
    that nothing reads as a checkpoint). An existing ``final`` is never replaced: that is an error
    raised before anything is written.
    """
    final = Path(final)
    if final.exists():
        raise KDTuneError(f"{final}: already exists; refusing to overwrite it (use a new output_dir or remove it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
