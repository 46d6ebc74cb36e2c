"""The primitives a recipe's own training loop is built from — never a trainer that owns the loop:

- `RunContext` (run.py): device, dtype, seed, output folder and resume point;
- `Distribution` (distribution.py) and `distributed.FSDPDistribution`: one device or FSDP2;
- `TrainingState` (state.py): counters, registered stateful objects and RNG, for exact resume;
- `StepBatches`, `validation_batches`, `to_device` (data.py): optimizer steps of micro-batches;
- `step_tokens`, `StepMetrics`, `check_finite` (step_metrics.py): token counts and metrics per step;
- `load_student`, `load_teacher`, `student_saver` (models.py) and `distillation_parts`;
- `check_memory_plan` (memory.py): a run whose models cannot fit is refused before they load;
- schedules, metric loggers, the progress bar, RNG helpers and plots.
"""

from kdtune.training.data import StepBatches, build_validation, check_positions, to_device, validation_batches
from kdtune.training.distillation import DistillationParts, distillation_parts, join_teacher, served_teacher
from kdtune.training.distribution import Distribution
from kdtune.training.memory import check_memory_plan
from kdtune.training.metric_logging import (
    JsonlLogger,
    MetricLogger,
    MultiLogger,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    build_metric_logger,
    progress_bar,
    read_metrics,
)
from kdtune.training.models import describe_trainable, is_lora, load_student, load_teacher, student_saver
from kdtune.training.plot import plot_metrics
from kdtune.training.precision import peak_memory_gb
from kdtune.training.rng import get_rng_state, set_rng_state, set_seed
from kdtune.training.run import RunContext
from kdtune.training.schedules import LinearSchedule, get_cosine_schedule_with_warmup
from kdtune.training.state import TrainingState
from kdtune.training.step_metrics import StepMetrics, check_finite, step_tokens

__all__ = [
    "DistillationParts",
    "Distribution",
    "JsonlLogger",
    "LinearSchedule",
    "MetricLogger",
    "MultiLogger",
    "RunContext",
    "StdoutLogger",
    "StepBatches",
    "StepMetrics",
    "TensorBoardLogger",
    "TrainingState",
    "WandBLogger",
    "build_metric_logger",
    "build_validation",
    "check_finite",
    "check_memory_plan",
    "check_positions",
    "describe_trainable",
    "distillation_parts",
    "get_cosine_schedule_with_warmup",
    "get_rng_state",
    "is_lora",
    "join_teacher",
    "load_student",
    "load_teacher",
    "peak_memory_gb",
    "plot_metrics",
    "progress_bar",
    "read_metrics",
    "set_rng_state",
    "served_teacher",
    "set_seed",
    "step_tokens",
    "student_saver",
    "to_device",
    "validation_batches",
]
