"""The ``README.md`` model card every saved checkpoint carries, in the Hugging Face convention.

The front matter (``base_model``, ``license``, ``tags``, ``library_name``) is what the hub indexes;
the body says how the checkpoint was made, read from the run's own records beside it
(``config.yaml``, ``run.json``, ``metrics.jsonl`` in the output folder): the recipe, the teacher,
the loss and ``kd_ratio``, the data, the steps and tokens, the last training and validation losses.
A folder written outside a run (``prune``) gets the front matter and its origin only.

The origin is where the student came from: the one recorded in the starting checkpoint's own card
when kdtune wrote it (so a chain prune → distill names the model it all began with), else the
starting checkpoint's ``_name_or_path``, else its folder; it is the card's ``base_model`` when it is a
hub repository id, and named in the text either way. The license is carried from the starting
checkpoint's card when it states one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kdtune.errors import warn

CARD = "README.md"
_TAGS = ["kdtune", "distillation"]


def _source_card_data(source_dir: Path) -> dict:
    from huggingface_hub import ModelCard

    path = Path(source_dir) / CARD
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a README that is not a model card: nothing to carry over
        return {}


def _origin(source_dir: Path, source_config: dict, inherited: dict) -> str:
    if "kdtune" in (inherited.get("tags") or []) and inherited.get("base_model"):
        return inherited["base_model"]
    return source_config.get("_name_or_path") or str(Path(source_dir).resolve())


def _is_repo_id(name) -> bool:
    """``owner/name`` as the hub spells repositories, and not a folder here."""
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None \
        and not Path(name).exists()


def _records(run_dir: Path, step_limit: int | None) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if step_limit is None or record.get("step", 0) <= step_limit:
            records.append(record)
    return records


def _component(node) -> str:
    """``_component_`` and its arguments, one line."""
    if not isinstance(node, dict):
        return str(node)
    args = ", ".join(f"{k}={v}" for k, v in node.items() if k != "_component_")
    return f"`{node.get('_component_')}`" + (f" ({args})" if args else "")


def _how_it_was_made(run_dir: Path, folder_name: str) -> list[str]:
    """Markdown lines from the run's records; empty when the folder was not written by a run."""
    from omegaconf import OmegaConf

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return []
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    kind, _, number = folder_name.partition("_")
    records = _records(run_dir, int(number) if kind == "step" and number.isdigit() else None)
    lines = ["## How it was made", ""]
    recipe = run.get("recipe") if isinstance(run.get("recipe"), dict) else {}
    if recipe.get("builtin"):
        lines.append(f"- Recipe: `{recipe['name'].removesuffix('.py')}` (built-in)")
    elif recipe.get("name"):
        lines.append(f"- Recipe: `{recipe['name']}` (a copied recipe, sha256 {recipe.get('sha256', '?')[:12]})")
    teacher = (cfg.get("teacher_checkpointer") or {}).get("checkpoint_dir") if isinstance(
        cfg.get("teacher_checkpointer"), dict) else None
    if teacher:
        lines.append(f"- Teacher: `{teacher}`")
    elif cfg.get("teacher_logits_cache"):
        lines.append(f"- Teacher: cached logits in `{cfg['teacher_logits_cache']}`")
    if cfg.get("kd_loss") is not None:
        lines.append(f"- Distillation loss: {_component(cfg['kd_loss'])}, kd_ratio={cfg.get('kd_ratio')}")
    if cfg.get("lmbda") is not None:
        lines.append(f"- On-policy fraction (lmbda): {cfg['lmbda']}")
    dataset = cfg.get("dataset")
    if isinstance(dataset, dict):
        where = dataset.get("data_files") or dataset.get("source")
        lines.append(f"- Data: {_component(dataset)}" if where is None else f"- Data: `{where}`")
    lines.append(f"- Saved at: `{folder_name}`")
    if records:
        last = records[-1]
        tokens = sum(r.get("num_tokens", 0) for r in records)
        lines.append(f"- Steps: {last.get('step')} (epoch {last.get('epoch')}); trained tokens in the "
                     f"{len(records)} logged steps: {tokens:,.0f}")
        losses = ", ".join(f"{k}={last[k]:.4f}" for k in ("loss", "ce_loss", "kd_loss") if k in last)
        lines.append(f"- Last logged training losses (step {last.get('step')}): {losses}")
        validated = [r for r in records if "val_loss" in r]
        if validated:
            v = validated[-1]
            keys = ("val_loss", "val_ce_loss", "val_kd_loss", "val_kl")
            values = ", ".join(f"{k}={v[k]:.4f}" for k in keys if k in v)
            lines.append(f"- Last validation (step {v.get('step')}): {values}")
    return lines


def write_model_card(folder: Path, *, final_name: str, run_dir: Path | None, source_dir: Path,
                     source_config: dict) -> None:
    """Write ``folder/README.md`` for the checkpoint that will be named ``final_name`` (in the output
    folder ``run_dir`` of a run, or None outside one)."""
    from huggingface_hub import ModelCard, ModelCardData

    inherited = _source_card_data(source_dir)
    origin = _origin(source_dir, source_config, inherited)
    # the hub takes a repository id there; a local folder is named in the text only
    data = ModelCardData(base_model=origin if _is_repo_id(origin) else None, license=inherited.get("license"),
                         library_name="transformers", tags=_TAGS, pipeline_tag="text-generation")
    body = [f"# {final_name}", "", f"A model written by kdtune from `{origin}`.", ""]
    if run_dir is not None:
        try:
            body += _how_it_was_made(run_dir, final_name)
        except Exception as e:  # a damaged record costs the card its story, never the checkpoint
            warn(f"{final_name}/{CARD}: the run's records could not be read ({type(e).__name__}: {e}); "
                 f"the model card says only where the model came from")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").save(folder / CARD)
