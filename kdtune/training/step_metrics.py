"""Counting an optimizer step's tokens and gathering its metrics over micro-batches and ranks.

The loss terms of a micro-batch are already divided by the step's token count (`step_tokens`), so
their sum over the step's micro-batches and ranks is the step's per-token mean: ``add`` sums.
Metrics that do not add up that way are declared as what they are: ``add_mean`` (a weighted mean,
e.g. over tokens), ``add_max`` and ``add_min``; ``reduce`` combines each kind correctly.
"""

import math

import torch

from kdtune.datasets import IGNORE_INDEX
from kdtune.errors import KDTuneError
from kdtune.training.distribution import Distribution


def step_tokens(micro: list[dict], dist: Distribution) -> int:
    """The trained tokens (labels other than -100) of an optimizer step: all its micro-batches, all ranks."""
    local = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro)
    total = int(dist.all_reduce(torch.tensor([local], dtype=torch.float64))[0])
    if total == 0:
        raise KDTuneError("every label of an optimizer step's batches is masked: no token to train on")
    return total


def _number(value) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


class StepMetrics:
    def __init__(self):
        self._sums: dict[str, float] = {}
        self._means: dict[str, list[float]] = {}  # name -> [sum of value * weight, sum of weights]
        self._max: dict[str, float] = {}
        self._min: dict[str, float] = {}

    def add(self, **values) -> None:
        """Terms whose sum over the step is the metric (losses divided by the step's token count)."""
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + _number(value)

    def add_mean(self, name: str, value, weight=1.0) -> None:
        """One observation of a weighted mean (``weight``: e.g. the tokens it was measured on)."""
        total = self._means.setdefault(name, [0.0, 0.0])
        total[0] += _number(value) * _number(weight)
        total[1] += _number(weight)

    def add_max(self, name: str, value) -> None:
        self._max[name] = max(self._max.get(name, -math.inf), _number(value))

    def add_min(self, name: str, value) -> None:
        self._min[name] = min(self._min.get(name, math.inf), _number(value))

    def reduce(self, dist: Distribution) -> dict[str, float]:
        """Every metric of the step over all ranks (each rank must add the same names)."""
        sums, means = sorted(self._sums), sorted(self._means)
        flat = [self._sums[k] for k in sums] + [v for k in means for v in self._means[k]]
        out = {}
        if flat:
            total = dist.all_reduce(torch.tensor(flat, dtype=torch.float64)).tolist()
            out.update(zip(sums, total[: len(sums)]))
            pairs = total[len(sums):]
            out.update({k: pairs[2 * i] / pairs[2 * i + 1] if pairs[2 * i + 1] else math.nan
                        for i, k in enumerate(means)})
        for values, op in ((self._max, "max"), (self._min, "min")):
            if values:
                names = sorted(values)
                reduced = dist.all_reduce(torch.tensor([values[k] for k in names], dtype=torch.float64), op)
                out.update(zip(names, reduced.tolist()))
        return out


def check_finite(loss: float, step: int, last_checkpoint) -> None:
    """Stop a run whose loss stopped being a number, naming the checkpoint to go back to."""
    if not math.isfinite(loss):
        kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
        raise KDTuneError(f"loss is {loss} at step {step}; stopping{kept}")
