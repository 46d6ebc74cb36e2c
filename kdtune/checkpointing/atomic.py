"""Folders that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from kdtune.errors import KDTuneError


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    that nothing reads as a checkpoint, removed by the next write of ``final`` and by a training
    run's start). An existing ``final`` is never
    replaced: that is an error raised before anything is written. The folder gets the permissions
    the user's umask gives (mkdtemp's are 0700). A failed write (a full disk, an I/O error) is one
    error naming the folder, with nothing of it left behind.
    """
    final = Path(final)
    if final.exists():
        raise KDTuneError(f"{final}: already exists; refusing to overwrite it (use a new output_dir or remove it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp*"):  # a killed write of this same folder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as e:
        raise KDTuneError(f"{final}: cannot be written ({e.strerror or e})") from None
    try:
        yield tmp
        umask = current_umask()
        for path in tmp.rglob("*"):
            if path.is_file():  # some writers (safetensors, mkstemp) make 0600 files: the umask decides
                os.chmod(path, 0o666 & ~umask)
                _fsync(path)
            elif path.is_dir():
                os.chmod(path, 0o777 & ~umask)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(final.parent)
    except (OSError, SafetensorError) as e:  # a full disk or an I/O error, reported by either writer
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).rpartition("I/O error: ")[2] or str(e)
        raise KDTuneError(f"{final}: cannot be written ({reason}); the partial folder was removed and "
                          f"the checkpoints written before it are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
