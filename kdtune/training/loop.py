"""The training loop every recipe shares: gradient accumulation normalized by the optimizer
step's valid-token count, clipping, schedule, metrics, progress, checkpoints and exact resume.

A recipe supplies an ``objective(batch, num_tokens) -> StepLoss`` whose ``loss`` is the batch's
summed token loss divided by ``num_tokens`` (the valid tokens of the whole optimizer step, across
micro-batches and ranks), so summing micro-batch losses gives the step's mean whatever the split.
A recipe whose training batches are made during the step (on-policy distillation generates them)
also supplies a ``prepare_step`` (see `StepPreparer`).
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from kdtune.checkpointing import load_recipe_state
from kdtune.errors import KDTuneError
from kdtune.training.precision import peak_memory_gb
from kdtune.training.rng import get_rng_state, set_rng_state

IGNORE_INDEX = -100


@dataclass
class StepLoss:
    loss: torch.Tensor  # differentiable, already divided by the step's token count
    parts: dict[str, float] = field(default_factory=dict)  # e.g. ce_loss, kd_loss, same normalization


class StepPreparer(Protocol):
    """Turns the dataloader's micro-batches of one optimizer step into the batches trained on, plus
    metrics to log; its state is saved with the loop's, so a resumed run makes the same batches."""

    def __call__(self, micro: list[dict]) -> tuple[list[dict], dict[str, float]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopSettings:
    epochs: int
    gradient_accumulation_steps: int = 1
    max_steps_per_epoch: int | None = None
    clip_grad_norm: float | None = None
    save_every_n_steps: int | None = None
    log_every_n_steps: int = 1


def steps_per_epoch(dataloader, settings: LoopSettings) -> int:
    n = dataloader.sampler.epoch_length // (dataloader.batch_size * settings.gradient_accumulation_steps)
    return min(n, settings.max_steps_per_epoch) if settings.max_steps_per_epoch else n


class Distribution:
    """What the loop needs to know about data parallelism; the single-device case does nothing.

    A subclass (``kdtune.training.distributed.FSDPDistribution``) joins a process group, reduces
    across ranks and keeps sharded training state in its own form; what ``optimizer_state_dict``
    and ``rng_state`` return is what ``load_recipe_state`` hands back to their ``load`` side.
    """

    rank, world_size, is_main = 0, 1, True

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group, if any, and return this process's device."""
        return device

    def all_reduce_sum(self, value: float) -> float:
        return value

    def grad_scale(self) -> float:
        """Factor for the loss so the averaged gradient across ranks equals the global mean."""
        return 1.0

    def clip_grad_norm(self, params, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_state_dict(self, model: torch.nn.Module, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: torch.nn.Module, optimizer, state) -> None:
        optimizer.load_state_dict(state)

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


class TrainLoop:
    def __init__(self, *, settings: LoopSettings, model: torch.nn.Module, objective: Callable,
                 optimizer, lr_scheduler, dataloader, device: torch.device, logger,
                 save: Callable[..., object], dist: Distribution | None = None,
                 prepare_step: StepPreparer | None = None):
        self.s, self.model, self.objective, self.prepare_step = settings, model, objective, prepare_step
        self.optimizer, self.lr_scheduler, self.dataloader = optimizer, lr_scheduler, dataloader
        self.device, self.logger, self.save = device, logger, save
        self.dist = dist or Distribution()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.last_checkpoint = None  # the folder of the newest checkpoint this run wrote

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.dataloader, self.s)

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "optimizer": self.dist.optimizer_state_dict(self.model, self.optimizer),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "rng": self.dist.rng_state()}
        if self.prepare_step is not None:
            state["prepare_step"] = self.prepare_step.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.dist.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.dist.set_rng_state(state["rng"])
        if self.prepare_step is not None:
            self.prepare_step.load_state_dict(state["prepare_step"])

    # -- training ---------------------------------------------------------------------------
    def train(self) -> None:
        if self.steps_per_epoch == 0:
            raise KDTuneError("the dataset is too small for one optimizer step: "
                              "lower batch_size or gradient_accumulation_steps")
        bar = tqdm(total=self.s.epochs * self.steps_per_epoch, initial=self.global_step,
                   disable=None if self.dist.is_main else True, dynamic_ncols=True, desc="train")
        while self.epoch < self.s.epochs:
            self._train_epoch(bar)
            if self.step_in_epoch >= self.steps_per_epoch:  # finished, not interrupted
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self._checkpoint(epoch=self.epoch)
        bar.close()
        if self.logger is not None:
            self.logger.close()

    def _train_epoch(self, bar) -> None:
        accum, bs = self.s.gradient_accumulation_steps, self.dataloader.batch_size
        self.dataloader.sampler.set_position(self.epoch, self.step_in_epoch * accum * bs)
        batches = iter(self.dataloader)
        self.model.train()
        while self.step_in_epoch < self.steps_per_epoch:
            t0 = time.perf_counter()
            micro, extra = [next(batches) for _ in range(accum)], {}
            if self.prepare_step is not None:
                micro, extra = self.prepare_step(micro)
            metrics = {**self._optimizer_step(micro), **extra}
            self.global_step += 1
            self.step_in_epoch += 1
            metrics["tokens_per_second"] = metrics["num_tokens"] / self.dist.world_size / (time.perf_counter() - t0)
            if self.global_step % self.s.log_every_n_steps == 0 and self.dist.is_main:
                self.logger.log_dict({"epoch": self.epoch, **metrics}, step=self.global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
            at_epoch_end = self.step_in_epoch >= self.steps_per_epoch
            if self.s.save_every_n_steps and self.global_step % self.s.save_every_n_steps == 0 and not at_epoch_end:
                self._checkpoint(step=self.global_step)

    def _optimizer_step(self, micro: list[dict]) -> dict:
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        num_tokens = int(self.dist.all_reduce_sum(local_tokens))
        if num_tokens == 0:
            raise KDTuneError(f"step {self.global_step + 1}: every label of the batch is masked")
        totals: dict[str, float] = {}
        scale = self.dist.grad_scale()
        for batch in micro:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out: StepLoss = self.objective(batch, num_tokens)
            (out.loss * scale).backward()
            for k, v in {"loss": out.loss.item(), **out.parts}.items():
                totals[k] = totals.get(k, 0.0) + v
        totals = {k: self.dist.all_reduce_sum(v) for k, v in totals.items()}
        if not math.isfinite(totals["loss"]):
            kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise KDTuneError(f"loss is {totals['loss']} at step {self.global_step + 1}; stopping{kept}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.s.clip_grad_norm:
            totals["grad_norm"] = self.dist.clip_grad_norm(params, self.s.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler.step()
        totals["num_tokens"] = num_tokens
        totals["peak_memory_gb"] = peak_memory_gb(self.device)
        return totals

    def _checkpoint(self, **step_or_epoch) -> None:
        self.last_checkpoint = self.save(recipe_state=self.state_dict(), **step_or_epoch)
