"""Shared training machinery the recipes compose: metric loggers, schedules, RNG state, plots."""

from kdtune.training.lr_schedules import get_cosine_schedule_with_warmup
from kdtune.training.metric_logging import (
    JsonlLogger,
    MetricLogger,
    MultiLogger,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    read_metrics,
)
from kdtune.training.plot import plot_metrics
from kdtune.training.rng import get_rng_state, set_rng_state, set_seed

__all__ = [
    "JsonlLogger",
    "MetricLogger",
    "MultiLogger",
    "StdoutLogger",
    "TensorBoardLogger",
    "WandBLogger",
    "get_cosine_schedule_with_warmup",
    "get_rng_state",
    "plot_metrics",
    "read_metrics",
    "set_rng_state",
    "set_seed",
]
