"""``kdtune plot``: loss and learning-rate curves of a run, drawn from its metrics.jsonl."""

import os
from pathlib import Path

from kdtune.errors import KDTuneError
from kdtune.training.metric_logging import METRICS_FILE, read_metrics

LOSS_KEYS = ("loss", "ce_loss", "kd_loss")
VAL_KEYS = ("val_loss", "val_ce_loss", "val_kd_loss", "val_kl")  # logged every validation.every_n_steps


def metric_series(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of each training and validation loss and of ``lr``; when a resumed run
    logged a step again, the later record wins."""
    by_step: dict[int, dict] = {}
    for record in read_metrics(metrics_path):
        if "step" in record:
            by_step.setdefault(record["step"], {}).update(record)
    steps = sorted(by_step)
    return {key: [(s, by_step[s][key]) for s in steps if _is_number(by_step[s].get(key))]
            for key in (*LOSS_KEYS, *VAL_KEYS, "lr")}


def plot_metrics(output_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path:
    """Draw the training losses (``loss``, ``ce_loss``, ``kd_loss``), the validation losses (dashed)
    and ``lr`` (those present) into a PNG.

    Reads ``output_dir/metrics.jsonl``; writes ``out_png`` (default ``output_dir/loss_curves.png``)
    and returns its path.
    """
    try:
        from matplotlib.figure import Figure  # the Agg canvas, without touching pyplot's global state
    except ImportError:
        raise KDTuneError("plotting needs matplotlib: pip install kdtune[plot]") from None
    metrics_path = Path(output_dir) / METRICS_FILE
    series = metric_series(metrics_path)
    if not any(series.values()):
        raise KDTuneError(f"{metrics_path}: no '{', '.join((*LOSS_KEYS, 'lr'))}' values to plot")

    fig = Figure(figsize=(8, 6), layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for key in LOSS_KEYS:
        if series[key]:
            loss_ax.plot(*zip(*series[key]), label=key, marker="." if len(series[key]) < 50 else None)
    for key in VAL_KEYS:
        if series[key]:
            loss_ax.plot(*zip(*series[key]), label=key, linestyle="--", marker="o", markersize=3)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(f"{Path(output_dir).resolve().name}: training curves")
    loss_ax.grid(alpha=0.3)
    if any(series[k] for k in (*LOSS_KEYS, *VAL_KEYS)):
        loss_ax.legend()
    if series["lr"]:
        lr_ax.plot(*zip(*series["lr"]), color="tab:gray")
    lr_ax.set_ylabel("lr")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    out = Path(out_png) if out_png is not None else Path(output_dir) / "loss_curves.png"
    fig.savefig(out, dpi=100)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
