"""Shared training machinery the recipes compose: setup, models, objectives, the loop, metric
loggers, schedules, RNG state and plots. Single-device and distributed recipes differ only where
distribution differs."""

from kdtune.training.loop import Distribution, LoopSettings, StepLoss, TrainLoop
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
from kdtune.training.models import describe_trainable, is_lora, load_student, load_teacher, student_saver
from kdtune.training.objectives import DistillationObjective, loss_options
from kdtune.training.plot import plot_metrics
from kdtune.training.rng import get_rng_state, set_rng_state, set_seed
from kdtune.training.setup import DistillationParts, RunContext, build_batches, build_loop, distillation_parts

__all__ = [
    "DistillationObjective",
    "DistillationParts",
    "Distribution",
    "JsonlLogger",
    "LoopSettings",
    "MetricLogger",
    "MultiLogger",
    "RunContext",
    "StdoutLogger",
    "StepLoss",
    "TensorBoardLogger",
    "TrainLoop",
    "WandBLogger",
    "build_batches",
    "build_loop",
    "describe_trainable",
    "distillation_parts",
    "get_cosine_schedule_with_warmup",
    "get_rng_state",
    "is_lora",
    "load_student",
    "load_teacher",
    "loss_options",
    "plot_metrics",
    "read_metrics",
    "set_rng_state",
    "set_seed",
    "student_saver",
]
