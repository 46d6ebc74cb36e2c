"""Structured pruning: a smaller student cut from the teacher by importance measured on calibration
data (layers by Block Influence or skipped-layer loss; heads, MLP channels and hidden channels by
their activations), written as a Hugging Face checkpoint for the distillation recipes."""

from kdtune.pruning.importance import Importance, calibration_batches, measure_importance
from kdtune.pruning.structure import (
    PruningPlan,
    check_targets,
    parameter_count,
    plan_pruning,
    prune_report,
    prune_state_dict,
    pruned_args,
    pruned_config,
)

__all__ = [
    "Importance",
    "PruningPlan",
    "calibration_batches",
    "check_targets",
    "measure_importance",
    "parameter_count",
    "plan_pruning",
    "prune_report",
    "prune_state_dict",
    "pruned_args",
    "pruned_config",
]
