"""The distribution strategy a recipe trains under: what changes between one device and several.

``Distribution`` is one process on one device: every method is the identity or the plain PyTorch
call. ``kdtune.training.distributed.FSDPDistribution`` joins a torchrun process group, reduces
across ranks and keeps sharded training state in its own form. A recipe's loop calls only these
methods, so its single-device and distributed versions share the loop line for line.
"""

import contextlib

import torch
from torch import nn

from kdtune.checkpointing import load_recipe_state
from kdtune.errors import KDTuneError
from kdtune.training.rng import get_rng_state, set_rng_state


class Distribution:
    rank, world_size, is_main = 0, 1, True

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group, if any, and return this process's device."""
        return device

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``values`` reduced elementwise over the ranks (``sum``, ``max`` or ``min``)."""
        return values

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate a micro-batch loss that is already this rank's share of the step's mean."""
        loss.backward()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """Clip the gradients of ``params`` to ``max_norm`` in total; returns the norm before."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def gathered(self, model: nn.Module):
        """A context in which ``model``'s whole weights stay on this process (for generation, whose
        many small forwards would otherwise gather each sharded layer again at every token)."""
        return contextlib.nullcontext(model)

    def rank_state(self, obj):
        """A stateful object whose state differs between ranks (a sampling generator), as one
        `TrainingState.register` can save and restore; on one process, the object itself."""
        return obj

    def optimizer_state(self, model: nn.Module, optimizer):
        """The optimizer as a stateful object for `TrainingState.register`; sharded runs wrap it."""
        return optimizer

    def module_state(self, module: nn.Module):
        """A module as a stateful object for `TrainingState.register`; sharded runs wrap it."""
        return module

    def rng_state(self):
        return get_rng_state()

    def set_rng_state(self, state) -> None:
        set_rng_state(state)

    def load_recipe_state(self, folder) -> dict:
        state = load_recipe_state(folder)
        if isinstance(state["rng"], list):  # one state per rank: written by a distributed run
            raise KDTuneError(f"resume_from_checkpoint: '{folder}' was saved by a run on {len(state['rng'])} "
                              f"processes; resume it with the distributed recipe on as many")
        return state
