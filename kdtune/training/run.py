"""The run a recipe starts: device, dtype, seed, output folder and resume point, and the run's
lifetime — its lock on the output folder, what it records, and how a signal stops it.

Creating a `RunContext` checks everything about the output folder and a resume without writing
anything, so a run refused by any check before training leaves no trace. ``start`` (just before the
loop) takes the folder's lock for the run's lifetime, removes temporary folders left by an
interrupted save, and on a fresh run records ``config.yaml`` and ``run.json`` (what defines the
run: settings, data, tokenizer, processes); a resumed run is checked against them instead.

SIGINT and SIGTERM during training stop the run after the step in progress (the same step on every
process), optionally saving a checkpoint there; a second signal stops it at once. Either way the
run ends with one line saying where it stopped and which checkpoint a resume uses.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdtune.checkpointing import latest_checkpoint
from kdtune.config import save_config
from kdtune.config.builtins import recipes_dir
from kdtune.datasets.fingerprint import fingerprint
from kdtune.errors import KDTuneError, RunStopped, warn
from kdtune.training.distribution import Distribution
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed

LOCK_FILE = ".kdtune.lock"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# What defines a run: a resume that changes one of these is refused unless resume_allow_changes
# names it. Everything else (epochs, learning rate, clipping, cadences, validation, device) may change.
DEFINING = ("checkpointer.checkpoint_dir", "tokenizer", "dataset", "model", "seed", "shuffle", "batch_size",
            "gradient_accumulation_steps", "dtype", "optimizer._component_", "teacher_checkpointer.checkpoint_dir",
            "teacher", "teacher_logits_cache", "kd_loss", "kd_ratio", "lmbda", "lmbda_end", "on_policy_loss", "seq_kd",
            "generation")
_MISSING = object()


class RunContext:
    """``device``, ``dtype``, ``seed``, ``output_dir`` and ``resume_dir`` (the checkpoint to resume
    from, or None) of this process, under the distribution strategy ``dist``."""

    def __init__(self, cfg: DictConfig, settings, dist: Distribution | None = None):
        self.cfg, self.settings = cfg, settings
        self.output_dir = Path(settings.output_dir)
        _check_writable(self.output_dir)
        _check_unlocked(self.output_dir)
        self.resume_dir = _resume_dir(self.output_dir, settings.resume_from_checkpoint)
        recorded = _read_run_file(self.output_dir) if self.resume_dir is not None else None
        self.recipe = _recipe_identity(Path(inspect.currentframe().f_back.f_code.co_filename))  # the caller's file
        if self.resume_dir is not None:
            allowed = getattr(settings, "resume_allow_changes", [])
            _check_same_run(self.output_dir, cfg, allowed, settings)
            _check_same_recipe(recorded, self.recipe, allowed)
        self.stopping: int | None = None  # the signal that asked the run to stop
        self.training = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        self.dist = dist or Distribution()
        self.device = self.dist.setup(resolve_device(settings.device))
        self.dtype = resolve_dtype(settings.dtype)
        self.autocast_dtype = resolve_dtype(settings.autocast, "autocast") if settings.autocast else None
        # A resumed run draws its data order from the seed the run began with, even one drawn at random.
        seed = recorded["seed"] if recorded and settings.seed is None else settings.seed
        self.seed = set_seed(seed)
        self._lock = None

    def autocast(self):
        """The forward's precision context: matmuls in ``autocast`` (bf16) with float32 weights, the
        optimizer state and the loss math left in float32; a no-op when ``autocast`` is null."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- the run's lifetime ----------------------------------------------------------------------
    def start(self, *, dataset, tokenizer, step: int | None = None) -> None:
        """Every check passed: lock the output folder, tidy it, and record (or check) what defines
        the run. Call it once, right before the training loop; ``step`` is the step a resumed run
        continues after (its records of later steps, logged before a kill, are dropped: they are redone)."""
        identity = {"seed": self.seed, "processes": self.dist.world_size, "recipe": self.recipe,
                    "tokenizer": getattr(tokenizer, "vocab_fingerprint", None), "dataset": fingerprint(dataset)}
        if self.dist.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._lock = _lock(self.output_dir)
                _remove_stale_temporaries(self.output_dir)
                if self.resume_dir is None:
                    _set_aside_earlier_logs(self.output_dir)
                    save_config(self.cfg, self.output_dir / CONFIG_FILE)
                    (self.output_dir / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")
                else:
                    _check_identity(self.output_dir, identity, getattr(self.settings, "resume_allow_changes", []))
                    if step is not None:
                        _drop_records_after(self.output_dir / METRICS_FILE, step)
            except OSError as e:
                raise KDTuneError(f"output_dir: cannot write to '{self.output_dir}': {e.strerror or e}") from None
        self.training = True

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop, agreed by every process (call once per step)."""
        asked = torch.tensor([float(self.stopping or 0)], dtype=torch.float64)
        signum = int(self.dist.all_reduce(asked, "max")[0])
        if signum:
            self.stopping = signum
        return bool(signum)

    def stop(self, step: int) -> None:
        """End the run after ``step``: raises `RunStopped` (one line, exit status 128 + the signal)."""
        raise RunStopped(self.stopping, f"stopped by {signal.Signals(self.stopping).name} after step {step}; "
                                        f"{self._resume_note()}")

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            raise RunStopped(signum, f"stopped by {name} before training began; {self._resume_note()}")
        if self.stopping is not None:
            raise RunStopped(signum, f"stopped by {name} during a step; {self._resume_note()}")
        self.stopping = signum
        if self.dist.is_main and sys.stderr.isatty():  # someone at a terminal waits for the step to end
            warn(f"{name}: stopping after this step (send it again to stop at once)")

    def _resume_note(self) -> str:
        found = latest_checkpoint(self.output_dir, with_recipe_state=True) if self.output_dir.is_dir() else None
        if found is None:
            return "no checkpoint yet, so a rerun starts from the beginning"
        return f"resume_from_checkpoint=true continues from {found}"


def _check_writable(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise KDTuneError(f"output_dir: '{output_dir}' is a file, not a folder")
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KDTuneError(f"output_dir: cannot write to '{existing}' (read-only or no permission)")


def _resume_dir(output_dir: Path, resume: bool) -> Path | None:
    """The newest complete checkpoint to resume from; refuses to run over an earlier run's checkpoints."""
    found = latest_checkpoint(output_dir, with_recipe_state=True) if output_dir.is_dir() else None
    if resume:
        if found is None:
            warn(f"resume_from_checkpoint: '{output_dir}' holds no checkpoint yet; starting from the beginning")
        return found
    if output_dir.is_dir() and latest_checkpoint(output_dir) is not None:
        raise KDTuneError(f"output_dir '{output_dir}' holds an earlier run's checkpoints; set "
                          f"resume_from_checkpoint=true to continue it or choose another output_dir")
    return None


def _read_run_file(output_dir: Path) -> dict | None:
    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KDTuneError(f"{path}: damaged; it records what defines the run being resumed") from None


def _select(tree, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _check_same_run(output_dir: Path, cfg: DictConfig, allowed, settings=None) -> None:
    """A resume keeps what defines the run, as its original ``config.yaml`` records it."""
    path = output_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        before = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # a damaged file: the YAML and interpolation errors have several types
        raise KDTuneError(f"{path}: cannot be read ({' '.join(str(e).split())})") from None
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in DEFINING:
        old, new = _select(before, key), _select(now, key)
        if old is _MISSING and "." not in key and settings is not None and _default(settings, key) == new:
            continue  # a setting added since the run began, at its default: what the run had
        if old != new and key not in allowed and key.split(".")[0] not in allowed:
            show = lambda v: "absent" if v is _MISSING else json.dumps(v, default=str)  # noqa: E731
            raise KDTuneError(
                f"resume_from_checkpoint: {key} was {show(old)} in the run being resumed and is {show(new)} now; "
                f"a resumed run keeps what defines it (data, tokenizer, model, loss, batch geometry): restore "
                f"it, start a new output_dir, or allow the change with resume_allow_changes=[{key}]")


def _recipe_identity(script: Path) -> dict | None:
    """The recipe file's name and SHA-256, and whether it is a built-in one (None when there is no file)."""
    if not script.is_file():
        return None
    builtin = script.resolve().parent == recipes_dir().resolve()
    return {"name": script.name, "sha256": hashlib.sha256(script.read_bytes()).hexdigest(), "builtin": builtin}


def _check_same_recipe(recorded: dict | None, recipe: dict | None, allowed) -> None:
    """A resume runs the recipe file the run began with: another one may register other state (a
    schedule, parameter groups) that the checkpoint does not hold, or hold state it ignores. A
    built-in recipe changed by a kdtune upgrade is only noted: the old file is not the user's to keep."""
    before = (recorded or {}).get("recipe")
    if before is None or recipe is None or before.get("sha256") == recipe["sha256"] or "recipe" in allowed:
        return
    show = lambda r: f"{r.get('name')} (sha256 {str(r.get('sha256'))[:12]})"  # noqa: E731
    if before.get("builtin") and recipe["builtin"] and before.get("name") == recipe["name"]:
        warn(f"resume_from_checkpoint: the built-in recipe {recipe['name']} changed since the run began (kdtune "
             f"was updated); resuming with the current one")
        return
    raise KDTuneError(f"resume_from_checkpoint: the recipe was {show(before)} in the run being resumed and is "
                      f"{show(recipe)} now; resume with the recipe file the run began with, start a new output_dir, "
                      f"or allow the change with resume_allow_changes=[recipe]")


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without the records of steps after ``step`` (atomically)."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


def _record_step(line: bytes) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):  # a torn last line: the logger cuts it off when it opens the file
        return 0


def _check_identity(output_dir: Path, identity: dict, allowed) -> None:
    recorded = _read_run_file(output_dir)
    if recorded is None:
        return
    what = {"dataset": "the dataset's samples", "tokenizer": "the tokenizer", "processes": "the number of processes"}
    for key, description in what.items():
        if recorded.get(key) != identity[key] and key not in allowed:
            raise KDTuneError(f"resume_from_checkpoint: {description} differ from the run being resumed "
                              f"({RUN_FILE}: {key}); restore them, start a new output_dir, or allow the change "
                              f"with resume_allow_changes=[{key}]")


def _check_unlocked(output_dir: Path) -> None:
    """Refuse early, writing nothing, a folder another run holds."""
    if (output_dir / LOCK_FILE).is_file():
        os.close(_flock(output_dir / LOCK_FILE, os.O_RDONLY))


def _lock(output_dir: Path) -> int:
    """Hold an exclusive lock on ``output_dir`` for this process's lifetime (the OS releases it
    when the process ends, however it ends), with this process's pid in the lock file."""
    fd = _flock(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _flock(path: Path, flags: int) -> int:
    """An open descriptor of ``path`` holding its exclusive lock; another run's lock is an error naming its pid."""
    fd = os.open(path, flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise KDTuneError(f"output_dir: '{path.parent}' is in use by another run (pid {holder}); wait for it to "
                          f"finish or choose another output_dir") from None
    return fd


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Hidden folders of saves that never completed (``.step_N.tmp…``, ``.step_N.optimizer``), and a
    rewrite of metrics.jsonl that a kill interrupted."""
    for path in output_dir.glob(".*_*"):
        if path.is_dir() and (".tmp" in path.name or path.name.endswith(".optimizer")):
            shutil.rmtree(path, ignore_errors=True)
    (output_dir / f".{METRICS_FILE}.tmp").unlink(missing_ok=True)


def _default(settings, key: str):
    """The default of the settings field ``key`` (``_MISSING`` when it has none)."""
    for f in dataclasses.fields(settings):
        if f.name == key:
            return f.default
    return _MISSING


def _set_aside_earlier_logs(output_dir: Path) -> None:
    """A fresh run in a folder an earlier run left without a checkpoint keeps that run's logs aside."""
    for name in (METRICS_FILE, CONFIG_FILE):
        path = output_dir / name
        if path.is_file():
            os.replace(path, path.with_name(f"{path.stem}.previous{path.suffix}"))
