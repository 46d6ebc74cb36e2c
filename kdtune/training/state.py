"""Where a training run is, and everything a resume restores.

A recipe registers each object that changes as it trains — the optimizer, the learning-rate
schedule, and anything of its own (a kd_ratio schedule, a learned projection, the on-policy
sampler) — saves ``state.state_dict()`` with every checkpoint, and on resume calls
``state.load(folder)`` once everything is built. The run then continues exactly where the
checkpoint was taken: the same epoch and step, the data order from the next sample on (see
`StepBatches`), the same random draws, and every registered object as it was — except that an
optimizer's hyperparameters (learning rate, betas, weight decay ...) are the config's, so a resume
with a new learning rate trains at it (the schedule continuing where it was); its moments are the
checkpoint's.
"""

from typing import Protocol

import torch

from kdtune.errors import KDTuneError
from kdtune.training.distribution import Distribution

_COUNTERS = ("epoch", "step_in_epoch", "global_step")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state) -> None: ...


class TrainingState:
    """``epoch`` (epochs finished), ``step_in_epoch`` and ``global_step`` (optimizer steps taken),
    the registered stateful objects, and the random-number generators of every rank."""

    def __init__(self, dist: Distribution | None = None):
        self.dist = dist or Distribution()
        self.epoch = self.step_in_epoch = self.global_step = 0
        self._objects: dict[str, Stateful] = {}

    def register(self, name: str, obj: Stateful) -> None:
        """Save ``obj.state_dict()`` under ``name`` with every checkpoint and restore it on resume.
        Its state must be tensors and plain Python values (checkpoints load with weights_only)."""
        if name in (*_COUNTERS, "rng") or name in self._objects:
            raise ValueError(f"TrainingState: '{name}' is taken")
        self._objects[name] = obj

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in _COUNTERS}
        state.update({name: obj.state_dict() for name, obj in self._objects.items()})
        state["rng"] = self.dist.rng_state()
        return state

    def load(self, folder) -> None:
        """Restore everything from the checkpoint ``folder`` (a step or epoch folder of this run)."""
        state = self.dist.load_recipe_state(folder)
        missing = [name for name in self._objects if name not in state]
        if missing:
            raise KDTuneError(f"resume_from_checkpoint: '{folder}' holds no state for '{missing[0]}', which this "
                              f"recipe trains; it was saved by another recipe or an earlier version of this one")
        for key in _COUNTERS:
            setattr(self, key, int(state[key]))
        configured = {name: [dict(group) for group in opt.param_groups]
                      for name, opt in self._optimizers().items()}
        for name, obj in self._objects.items():
            try:
                obj.load_state_dict(state[name])
            except torch.cuda.OutOfMemoryError:
                raise
            except (ValueError, KeyError, RuntimeError, IndexError) as e:  # torch's messages for a changed shape
                raise KDTuneError(f"resume_from_checkpoint: '{folder}' holds a '{name}' that does not fit this run's "
                                  f"({' '.join(str(e).split())[:200]}); something it depends on changed since the "
                                  f"checkpoint (the recipe's parameter groups or modules, the device): resume as the "
                                  f"run began, or start a new output_dir") from None
        for name, opt in self._optimizers().items():
            for group, fresh in zip(opt.param_groups, configured[name]):
                _configured_hyperparameters(group, fresh)
        for obj in self._objects.values():
            if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
                obj.base_lrs = [group["initial_lr"] for group in obj.optimizer.param_groups]
            if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):  # this run's horizon (epochs may differ)
                for group, base, factor in zip(obj.optimizer.param_groups, obj.base_lrs, obj.lr_lambdas):
                    group["lr"] = base * factor(obj.last_epoch)
        self.dist.set_rng_state(state["rng"])  # last: nothing above may draw from the restored generators

    def _optimizers(self) -> dict:
        found = {name: getattr(obj, "optimizer", obj) for name, obj in self._objects.items()}
        return {name: opt for name, opt in found.items() if isinstance(opt, torch.optim.Optimizer)}


def _configured_hyperparameters(group: dict, fresh: dict) -> None:
    """Put the config's hyperparameters back into a loaded parameter group; a changed base learning
    rate keeps the schedule's current factor."""
    for key, value in fresh.items():
        if key not in ("params", "lr", "initial_lr") and group.get(key) != value:
            group[key] = value
    if "initial_lr" in fresh and fresh["initial_lr"] != group.get("initial_lr"):
        factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        group["initial_lr"], group["lr"] = fresh["initial_lr"], fresh["initial_lr"] * factor
