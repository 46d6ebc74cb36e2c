"""An optimizer step's token count and metrics over micro-batches and ranks, and the training state a
resume restores: each reduced as what it is (sums, weighted means, extremes), checked against the
value computed on all the data at once."""

import pytest
import torch

from kdtune.checkpointing import save_recipe_state
from kdtune.errors import KDTuneError
from kdtune.training import Distribution, StepMetrics, TrainingState, step_tokens


class TwoRanks(Distribution):
    """Rank 0 of a pretend 2-rank run whose other rank reduces ``other`` (given per call order)."""

    world_size = 2

    def __init__(self, other: list[torch.Tensor]):
        self.other = list(other)

    def all_reduce(self, values, op="sum"):
        theirs = self.other.pop(0)
        return {"sum": values + theirs, "max": torch.maximum(values, theirs), "min": torch.minimum(values, theirs)}[op]


def rank_metrics(observations):
    metrics = StepMetrics()
    for loss, agreement, tokens, norm in observations:
        metrics.add(loss=loss)
        metrics.add_mean("agreement", agreement, weight=tokens)
        metrics.add_max("norm_max", norm)
        metrics.add_min("norm_min", norm)
    return metrics


def test_each_kind_of_metric_is_reduced_over_micro_batches_and_ranks():
    ours = [(0.25, 0.5, 10, 3.0), (0.125, 1.0, 30, 1.0)]  # two micro-batches on this rank
    theirs = [(0.5, 0.0, 20, 7.0)]
    everything = ours + theirs
    other = rank_metrics(theirs)
    # What the other rank contributes, in the order `reduce` reduces: sums and means, then max, then min.
    other_flat = torch.tensor([other._sums["loss"], *other._means["agreement"]], dtype=torch.float64)
    reduced = rank_metrics(ours).reduce(TwoRanks([other_flat, torch.tensor([7.0], dtype=torch.float64),
                                                  torch.tensor([7.0], dtype=torch.float64)]))
    tokens = sum(o[2] for o in everything)
    assert reduced["loss"] == pytest.approx(sum(o[0] for o in everything))
    assert reduced["agreement"] == pytest.approx(sum(o[1] * o[2] for o in everything) / tokens)
    assert reduced["norm_max"] == 7.0 and reduced["norm_min"] == 1.0
    alone = rank_metrics(everything).reduce(Distribution())
    assert alone == pytest.approx(reduced)


def test_step_tokens_counts_every_micro_batch_and_rank():
    micro = [{"labels": torch.tensor([[-100, 1, 2], [3, -100, -100]])}, {"labels": torch.tensor([[4, 5, 6]])}]
    assert step_tokens(micro, Distribution()) == 6
    assert step_tokens(micro, TwoRanks([torch.tensor([4.0], dtype=torch.float64)])) == 10
    with pytest.raises(KDTuneError, match="masked"):
        step_tokens([{"labels": torch.full((2, 3), -100)}], Distribution())


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def test_training_state_restores_counters_objects_and_random_draws(tmp_path):
    state = TrainingState()
    counter = Counter()
    state.register("counter", counter)
    state.epoch, state.step_in_epoch, state.global_step, counter.n = 1, 3, 9, 42
    torch.manual_seed(5)
    save_recipe_state(tmp_path, state.state_dict())
    expected_draw = torch.rand(3)

    resumed, counter2 = TrainingState(), Counter()
    resumed.register("counter", counter2)
    torch.manual_seed(123)
    resumed.load(tmp_path)
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step, counter2.n) == (1, 3, 9, 42)
    assert torch.equal(torch.rand(3), expected_draw)

    other = TrainingState()
    other.register("schedule", Counter())
    with pytest.raises(KDTuneError, match="no state for 'schedule'"):
        other.load(tmp_path)
    with pytest.raises(ValueError, match="taken"):
        other.register("rng", Counter())
