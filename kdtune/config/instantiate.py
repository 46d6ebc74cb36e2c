"""Building objects from ``_component_`` nodes, and checking a config without building anything.

A component is a registry short name (``adamw``, ``jsd``) or a dotted path to any importable
callable. Nested component nodes are built first; the recipe may add positional and keyword
arguments at the call (``instantiate(cfg.optimizer, model.parameters())``).
"""

import difflib
import importlib
import inspect
import sys
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.config.registry import COMPONENTS
from kdtune.errors import KDTuneError


def resolve_component(name: str, where: str = "_component_") -> Callable:
    """A short name or dotted path -> the callable it names."""
    if not isinstance(name, str) or not name:
        raise KDTuneError(f"{where}: expected a component name, got {name!r}")
    path = COMPONENTS.get(name, name)
    module_name, _, attr = path.rpartition(".")
    obj = missing = None
    if module_name:
        try:
            obj = getattr(importlib.import_module(module_name), attr, None)
        except ImportError as e:
            if not _is_missing_module(e, module_name):
                raise
            missing = e.name
    if obj is None and module_name:  # a nested attribute, e.g. package.Class.from_x
        parent_name, _, parent_attr = module_name.rpartition(".")
        try:
            parent = getattr(importlib.import_module(parent_name), parent_attr, None) if parent_name else None
        except ImportError:
            parent = None
        obj = getattr(parent, attr, None)
    if not callable(obj):
        close = difflib.get_close_matches(name, list(COMPONENTS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else " (see 'kdtune ls --components')"
        raise KDTuneError(f"{where}: cannot resolve component '{name}': {_where_looked(module_name, attr, missing)}"
                          f"{hint}")
    return obj


def _where_looked(module_name: str, attr: str, missing: str | None) -> str:
    """Where a dotted path was looked for: the registry, then the module on the import path."""
    if not module_name:
        return "not a registry short name"
    if missing:
        python = (sys.prefix, sys.base_prefix)  # the installation's own folders: named as "installed packages"
        folders = [p or "." for p in sys.path if not p.startswith(python)]
        where = f"{', '.join(folders[:4])} or the installed packages" if folders else "the installed packages"
        return (f"not a registry short name, and no module '{missing}' in {where} (a module beside a copied "
                f"recipe imports under `kdtune run` and `python recipe.py`)")
    module = sys.modules.get(module_name)
    found = f" ({module.__file__})" if getattr(module, "__file__", None) else ""
    return f"module '{module_name}'{found} has no callable '{attr}'"


def _is_missing_module(e: ImportError, module_name: str) -> bool:
    # Only the named module (or one of its parents) being absent means "unresolvable"; an import
    # error raised from inside an existing module is a real bug and propagates.
    missing = getattr(e, "name", None)
    return missing is not None and (module_name == missing or module_name.startswith(missing + "."))


def _to_plain(node, where: str) -> Any:
    try:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except OmegaConfBaseException as e:
        raise KDTuneError(f"{where}: {' '.join(str(e).split())}") from None


def instantiate(node, *args, _where: str | None = None, **kwargs):
    """Build the object a ``_component_`` node describes (``None`` stays ``None``)."""
    if node is None:
        return None
    where = _where or _node_key(node)
    plain = _to_plain(node, where)
    if not isinstance(plain, dict) or "_component_" not in plain:
        raise KDTuneError(f"{where}: expected a node with a '_component_' key")
    return _build(plain, where, args, kwargs)


def _build(plain: dict, where: str, args=(), extra=None):
    fn = resolve_component(plain["_component_"], f"{where}._component_")
    _check_arguments(fn, plain, where)
    kwargs = {k: _build_nested(v, f"{where}.{k}") for k, v in plain.items() if k != "_component_"}
    kwargs.update(extra or {})
    _check_binding(fn, plain["_component_"], where, args, kwargs)
    try:
        return fn(*args, **kwargs)
    except KDTuneError as e:  # kdtune's own components name the argument; this names the node too
        raise (e if str(e).startswith(where) else KDTuneError(f"{where}: {e}")) from None
    except (ValueError, TypeError) as e:  # a component refusing its arguments (torch's optimizers do)
        raise KDTuneError(f"{where}: '{plain['_component_']}' refused its arguments: {' '.join(str(e).split())}") \
            from None


def _build_nested(value, where: str):
    if isinstance(value, dict):
        if "_component_" in value:
            return _build(value, where)
        return {k: _build_nested(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _check_arguments(fn, given: dict, where: str) -> None:
    """The ranges a component declares for its arguments (`kdtune.config.checks.argument_checks`)."""
    for name, check in getattr(fn, "argument_checks", {}).items():
        if name in given:
            check(f"{where}.{name}", given[name])


def _check_binding(fn, name: str, where: str, args, kwargs, partial: bool = False) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return
    params = sig.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params or params[key].kind is inspect.Parameter.POSITIONAL_ONLY:
                close = difflib.get_close_matches(key, list(params), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise KDTuneError(f"{where}: '{name}' takes no argument '{key}'{hint}")
    try:
        (sig.bind_partial if partial else sig.bind)(*args, **kwargs)
    except TypeError as e:
        raise KDTuneError(f"{where}: arguments do not fit '{name}': {e}") from None


def validate(cfg: DictConfig) -> int:
    """Check that every component in ``cfg`` resolves and its arguments bind; build nothing.

    Arguments the recipe adds at run time (model parameters, the tokenizer) may be missing, so the
    binding is partial: an unknown or duplicated argument is an error, a missing one is not.
    Returns the number of component nodes checked.
    """
    plain = _to_plain(cfg, "config")
    return _validate_node(plain, "")


def _validate_node(value, where: str) -> int:
    count = 0
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "_component_":
                count += _validate_node(v, f"{where}.{k}" if where else str(k))
        if "_component_" in value:
            fn = resolve_component(value["_component_"], f"{where or 'config'}._component_")
            kwargs = {k: v for k, v in value.items() if k != "_component_"}
            _check_arguments(fn, kwargs, where or "config")
            _check_binding(fn, value["_component_"], where or "config", (), kwargs, partial=True)
            count += 1
    elif isinstance(value, list):
        for i, v in enumerate(value):
            count += _validate_node(v, f"{where}[{i}]")
    return count


def _node_key(node) -> str:
    # OmegaConf has no public accessor for a node's dotted key; it only labels messages.
    key = node._get_full_key(None) if isinstance(node, DictConfig) else ""
    return key or "config"
