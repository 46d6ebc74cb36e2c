"""Schedules: the learning rate's (as ``LambdaLR``, so its state saves and resumes with the
optimizer's) and a linear one for any other value a recipe varies over training (kd_ratio,
temperature), stateful so a resumed run continues it exactly."""

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kdtune.config.checks import argument_checks, integer, number
from kdtune.errors import KDTuneError


def cosine_with_warmup_factor(step: int, *, num_warmup_steps: int, num_training_steps: int,
                              num_cycles: float) -> float:
    """The multiplier of the base learning rate at ``step``.

    Rises linearly from 0 over the warmup, then follows ``num_cycles`` periods of a cosine (the
    default half period is one smooth decay from 1 to 0 at ``num_training_steps``); steps past the
    end keep the final value instead of climbing back up.
    """
    if step < num_warmup_steps:
        return step / num_warmup_steps
    progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress)))


@argument_checks(num_warmup_steps=integer(0), num_cycles=number(0))
def get_cosine_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                    num_training_steps: int, num_cycles: float = 0.5,
                                    last_epoch: int = -1) -> LambdaLR:
    """Linear warmup from 0 to the optimizer's learning rate, then cosine decay to 0.

    The factor is a ``functools.partial`` of a module function rather than a closure, so the
    scheduler's ``state_dict`` stays plain data (loadable with ``torch.load(weights_only=True)``).
    """
    if num_warmup_steps < 0:
        raise KDTuneError(f"lr_scheduler.num_warmup_steps must be >= 0, got {num_warmup_steps}")
    if num_training_steps < 1:
        raise KDTuneError(f"lr_scheduler.num_training_steps must be >= 1, got {num_training_steps}")
    factor = functools.partial(cosine_with_warmup_factor, num_warmup_steps=num_warmup_steps,
                               num_training_steps=num_training_steps, num_cycles=num_cycles)
    return LambdaLR(optimizer, factor, last_epoch=last_epoch)


class LinearSchedule:
    """A value going linearly from ``start`` to ``end`` over ``num_steps`` steps, then staying at
    ``end``: ``value`` is ``start`` before the first ``step()`` and ``end`` after ``num_steps - 1``
    of them, so a run of ``num_steps`` optimizer steps that reads ``value`` and then calls
    ``step()`` trains its first step at ``start`` and its last at ``end`` (one step: at ``end``).
    Register it with the run's `TrainingState` so a resumed run picks it up where the checkpoint left it."""

    def __init__(self, start: float, end: float, num_steps: int):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise KDTuneError(f"LinearSchedule num_steps: expected a positive integer, got {num_steps!r}")
        self.start, self.end, self.num_steps = float(start), float(end), num_steps
        self.steps_taken = 0

    @property
    def value(self) -> float:
        progress = min(self.steps_taken / (self.num_steps - 1), 1.0) if self.num_steps > 1 else 1.0
        return self.start + (self.end - self.start) * progress

    def step(self) -> None:
        self.steps_taken += 1

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.steps_taken = int(state["steps_taken"])
