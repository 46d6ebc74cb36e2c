"""Training state for resuming (optimizer, scheduler, epoch, step, RNG states, data position),
saved beside the weights of a step folder, and finding the newest complete step folder."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from kdtune.checkpointing.hf_format import CONFIG
from kdtune.errors import KDTuneError

RECIPE_STATE = "recipe_state.pt"
_STEP_DIR = re.compile(r"(step|epoch)_(\d+)")


def save_recipe_state(checkpoint_dir: str | Path, state: dict) -> Path:
    """``torch.save`` ``state`` to ``checkpoint_dir/recipe_state.pt`` via a temporary file and
    rename. Keep it to tensors and Python containers/numbers/strings: it is loaded with
    ``weights_only=True``, which refuses arbitrary objects."""
    path = Path(checkpoint_dir) / RECIPE_STATE
    fd, tmp = tempfile.mkstemp(prefix=f".{RECIPE_STATE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as e:
                # torch's zip writer reports a full disk as a RuntimeError about file positions;
                # the partial file has just filled the disk, so that is what to say
                if shutil.disk_usage(path.parent).free < 2**20:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_recipe_state(checkpoint_dir: str | Path) -> dict:
    """Load ``recipe_state.pt`` safely (``weights_only=True``: no code runs while unpickling)."""
    path = Path(checkpoint_dir) / RECIPE_STATE
    if not path.is_file():
        raise KDTuneError(f"{path}: not found; cannot resume from {checkpoint_dir}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        raise KDTuneError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None


def latest_checkpoint(output_dir: str | Path, *, with_recipe_state: bool = False) -> Path | None:
    """The most recently saved complete ``step_N``/``epoch_N`` folder of ``output_dir`` (None if none).

    Complete means renamed into place (temporary folders are hidden and never match) with a
    ``config.json``; ``with_recipe_state`` also requires ``recipe_state.pt``, for resuming. Folders
    are ordered by when their ``config.json`` was written, then by N.
    """
    candidates = []
    for path in Path(output_dir).glob("*_*"):
        match = _STEP_DIR.fullmatch(path.name)
        config = path / CONFIG
        if not match or not config.is_file() or (with_recipe_state and not (path / RECIPE_STATE).is_file()):
            continue
        candidates.append((config.stat().st_mtime_ns, int(match[2]), path))
    return max(candidates)[2] if candidates else None
