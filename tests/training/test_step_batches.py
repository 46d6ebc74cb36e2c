"""`StepBatches` with ``lookahead``: the same micro-batches and counters as without, a resume from
the middle of an epoch included, with the next step's batches loading while the caller holds this one."""

import threading

import torch

from kdtune.training import StepBatches, TrainingState


class Numbers:
    """Sample i is ``{"x": i}``; records which thread loaded which samples."""

    def __init__(self, n: int):
        self.n, self.loads = n, []
        self.loaded = {}  # first index of a batch -> Event set once it loads

    def __len__(self):
        return self.n

    def __getitems__(self, indices):
        self.loads.append((threading.current_thread().name, list(indices)))
        self.loaded.setdefault(indices[0], threading.Event()).set()
        return [{"x": i} for i in indices]


def collate(samples):
    return torch.tensor([s["x"] for s in samples])


def walk(lookahead: bool, state: TrainingState, epochs: int = 2):
    steps = StepBatches(Numbers(40), batch_size=3, collate_fn=collate, seed=7, gradient_accumulation_steps=2,
                        max_steps_per_epoch=5, lookahead=lookahead)
    seen = []
    while state.epoch < epochs:
        for micro in steps.epoch(state):
            seen.append((state.epoch, state.step_in_epoch, state.global_step, [m.tolist() for m in micro]))
    return seen


def test_lookahead_hands_out_the_same_steps_and_counters():
    assert walk(True, TrainingState()) == walk(False, TrainingState())


def test_lookahead_resumes_from_the_middle_of_an_epoch_as_without():
    states = []
    for _ in range(2):
        state = TrainingState()
        state.epoch, state.step_in_epoch, state.global_step = 1, 2, 7
        states.append(state)
    assert walk(True, states[0]) == walk(False, states[1])
    assert len(walk(False, TrainingState(), epochs=1)) == 5


def test_the_next_step_loads_while_the_caller_holds_this_one():
    data = Numbers(40)
    steps = StepBatches(data, batch_size=2, collate_fn=collate, seed=0, shuffle=False, lookahead=True,
                        max_steps_per_epoch=4)
    state = TrainingState()
    for micro in steps.epoch(state):
        if state.step_in_epoch < 4:  # the next step's batch (its first sample is known) loads meanwhile
            following = int(micro[0][0]) + 2
            assert data.loaded.setdefault(following, threading.Event()).wait(timeout=30)
    assert all(name.startswith("lookahead") for name, _ in data.loads)
    assert len(data.loads) == 4  # nothing loaded past the epoch's last step
