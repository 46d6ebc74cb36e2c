"""Evaluation with the EleutherAI LM Evaluation Harness: kdtune models as an lm-eval ``LM``, and the
task lookup and results file of the ``eleuther_eval`` recipe. Needs the ``eval`` extra (lm-eval)."""

from kdtune.eval.harness import check_tasks, save_results, task_list, task_manager
from kdtune.eval.lm import KDTuneLM

__all__ = ["KDTuneLM", "check_tasks", "save_results", "task_list", "task_manager"]
