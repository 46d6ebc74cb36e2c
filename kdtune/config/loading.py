"""Loading a YAML config and applying command-line overrides (the Hydra convention).

``key=value`` must name an existing key (a typo gets the nearest key suggested), ``+key=value``
adds a key, ``~key`` removes one, and ``node=NAME`` on a component node swaps its ``_component_``.
"""

import difflib
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.config.builtins import find_config
from kdtune.errors import KDTuneError

_MISSING = object()


def load_config(name_or_path: str, overrides: list[str] = ()) -> DictConfig:
    """Read a built-in config name or a ``.yaml`` path, then apply ``overrides`` in order."""
    path = find_config(name_or_path)
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise KDTuneError(f"config file '{path}' is not valid YAML: {_one_line(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise KDTuneError(f"config file '{path}' must hold a mapping at the top level")
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: DictConfig, overrides) -> DictConfig:
    for item in overrides:
        if item.startswith("~"):
            _remove(cfg, item[1:])
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.lstrip("+"):
            raise KDTuneError(f"override '{item}' must look like key=value, +key=value or ~key")
        value = _parse_value(item, raw)
        if key.startswith("+"):
            key = key[1:]
            if _select(cfg, key) is not _MISSING:
                raise KDTuneError(f"override '{item}': key '{key}' exists already; drop the '+'")
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            continue
        current = _select(cfg, key)
        if current is _MISSING:
            raise KDTuneError(f"override '{item}': no key '{key}' in the config{_nearest(cfg, key)}")
        if isinstance(current, DictConfig) and "_component_" in current and isinstance(value, str):
            current["_component_"] = value  # optimizer=adamw_8bit swaps the component
        else:
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _parse_value(item: str, raw: str):
    """Parse the right-hand side the way YAML would (numbers, lists, null), as OmegaConf does."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise KDTuneError(f"override '{item}': cannot parse value: {_one_line(e)}") from None


def _select(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False, throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return _MISSING


def _remove(cfg: DictConfig, key: str) -> None:
    parent_key, _, last = key.rpartition(".")
    parent = _select(cfg, parent_key) if parent_key else cfg
    if _select(cfg, key) is _MISSING or not isinstance(parent, (DictConfig, ListConfig)):
        raise KDTuneError(f"override '~{key}': no key '{key}' in the config{_nearest(cfg, key)}")
    del parent[int(last) if isinstance(parent, ListConfig) else last]


def all_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a plain (container) config, nested ones included."""
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            keys.append(f"{prefix}{k}")
            keys += all_keys(v, f"{prefix}{k}.")
    return keys


def _nearest(cfg: DictConfig, key: str) -> str:
    keys = all_keys(OmegaConf.to_container(cfg, resolve=False))
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the config a run used next to its outputs (for reproducing it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
