"""Metric loggers: one small interface, ``log_dict(metrics, step)`` and ``close()``.

Recipes log to ``${output_dir}/metrics.jsonl`` by default; stdout, TensorBoard and Weights & Biases
are opt-in, and ``MultiLogger`` sends each call to several. Tensor and numpy values become plain
Python numbers first, so every backend (and ``json``) sees floats, never device tensors.
"""

import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from kdtune.errors import KDTuneError

METRICS_FILE = "metrics.jsonl"


class MetricLogger(Protocol):
    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def to_plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors become floats and numpy scalars Python numbers; other values pass unchanged."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = float(value.item())
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


class JsonlLogger:
    """Appends one JSON object per call, ``{"step": step, **metrics}``, to ``log_dir/metrics.jsonl``.

    Each record is written as one whole line and flushed, so a reader never sees a torn record
    from a finished call. A resumed run appends to the same file; a partial last line left by a
    run killed mid-write is cut off first, so the next record starts on a line of its own.
    """

    def __init__(self, log_dir: str | os.PathLike):
        self.path = Path(log_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        _drop_partial_last_line(self._file)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        line = json.dumps({"step": int(step), **to_plain(metrics)}) + "\n"
        try:
            self._file.write(line.encode())
            self._file.flush()
        except OSError as e:
            raise KDTuneError(f"{self.path}: cannot be written ({e.strerror or e})") from None

    def close(self) -> None:
        self._file.close()


def _drop_partial_last_line(f) -> None:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b"\n") + 1)
    f.seek(0, os.SEEK_END)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order.

    An unparsable last line without a newline is a record still being written and is skipped;
    any other bad line is a user error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise KDTuneError(f"metrics file not found: {path}")
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: an unfinished write
                continue
            raise KDTuneError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise KDTuneError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


class StdoutLogger:
    """Prints ``step N | key value | ...`` lines, through tqdm so an active progress bar stays intact."""

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        from tqdm import tqdm

        parts = [f"step {int(step)}"]
        for key, value in to_plain(metrics).items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        tqdm.write(" | ".join(parts))

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Writes numeric metrics as TensorBoard scalars under ``log_dir``; flushes every call."""

    def __init__(self, log_dir: str | os.PathLike, **kwargs):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KDTuneError(
                "tensorboard_logger needs the 'tensorboard' package: pip install tensorboard"
            ) from None
        self._writer = SummaryWriter(log_dir=str(log_dir), **kwargs)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in to_plain(metrics).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandBLogger:
    """Logs to a Weights & Biases run; extra keyword arguments go to ``wandb.init``."""

    def __init__(self, project: str, entity: str | None = None, name: str | None = None,
                 log_dir: str | os.PathLike | None = None, **kwargs):
        try:
            import wandb
        except ImportError:
            raise KDTuneError("wandb_logger needs the 'wandb' package: pip install wandb") from None
        self._run = wandb.init(project=project, entity=entity, name=name,
                               dir=None if log_dir is None else str(log_dir), **kwargs)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log(to_plain(metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


class MultiLogger:
    """Sends every call to each of ``loggers`` in order."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = list(loggers)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_metric_logger(node, output_dir, dist) -> MetricLogger | None:
    """The config's ``metric_logger`` (none: ``metrics.jsonl`` in ``output_dir``) on the main
    process; None on the others, which log nothing."""
    if not dist.is_main:
        return None
    from kdtune.config import instantiate

    return instantiate(node) if node is not None else JsonlLogger(output_dir)


def progress_bar(total: int, initial: int, dist):
    """A tqdm bar on the main process (hidden when stderr is not a terminal), none on the others."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=None if dist.is_main else True, dynamic_ncols=True,
                desc="train")
