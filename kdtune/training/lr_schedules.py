"""Learning-rate schedules, as ``LambdaLR`` so their state saves and resumes with the optimizer's."""

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

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
