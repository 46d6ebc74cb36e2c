"""The lm-eval side of the ``eleuther_eval`` recipe: finding tasks, running them, saving results."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from kdtune.errors import KDTuneError


def task_list(tasks, key: str = "tasks") -> list[str]:
    """A config's tasks as a list of names: a list, or one string of comma-separated names."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks or [])
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise KDTuneError(f"{key}: name at least one lm-eval task")
    return names


def task_manager(include_path: str | list[str] | None = None, *, include_defaults: bool = True):
    """lm-eval's task index: the built-in tasks (unless ``include_defaults`` is false, which skips
    indexing thousands of YAML files) plus the task YAMLs under ``include_path``."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise KDTuneError(f"include_path: no such folder: {path}")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def check_tasks(manager, names: list[str]) -> None:
    """Every name is a task, group or tag lm-eval knows, or a task YAML file; else a user error
    naming the unknown ones (before any weights load)."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]
    if not unknown:
        return
    hints = [f"'{close[0]}' for '{n}'" for n in unknown if (close := difflib.get_close_matches(n, known, n=1))]
    where = "" if manager.include_path is None else f" or under include_path {manager.include_path}"
    raise KDTuneError(
        f"tasks: unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not a task, group or tag of "
        f"lm-eval{where}" + (f"; did you mean {', '.join(hints)}?" if hints else "")
    )


def save_results(results: dict, path: str | Path, *, log_samples: bool = False) -> Path:
    """Write ``simple_evaluate``'s results as JSON (atomically), per-sample records only with
    ``log_samples``; values JSON cannot hold (numpy scalars, sets, callables) become plain ones."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    kept = {k: v for k, v in results.items() if log_samples or k != "samples"}
    text = json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
