"""Batches in a reproducible order that a resumed run picks up mid-epoch, grouped into optimizer steps.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a run resumed at step
``k`` of an epoch skips exactly the samples the interrupted run had consumed and sees the same
batches afterwards. Under data parallelism each rank takes every ``world_size``-th index.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Sampler

from kdtune.datasets import IGNORE_INDEX
from kdtune.errors import KDTuneError
from kdtune.losses import TeacherTopK
from kdtune.training.distribution import Distribution
from kdtune.training.state import TrainingState


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Begin ``epoch`` at this rank's ``start``-th sample."""
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        # Every rank gets the same number of samples, so collective steps stay in lockstep.
        per_rank = self.num_samples // self.world_size
        return order[self.rank: per_rank * self.world_size: self.world_size]

    @property
    def epoch_length(self) -> int:
        """Samples this rank sees in a whole epoch (``len`` counts only those still to come)."""
        return self.num_samples // self.world_size

    def __iter__(self):
        return iter(self._order()[self.start:])

    def __len__(self) -> int:
        return max(self.epoch_length - self.start, 0)


class StepBatches:
    """The training data as optimizer steps: each step is ``gradient_accumulation_steps``
    micro-batches of ``batch_size`` samples per process, in the resumable order above.

    Refuses, before any weight is loaded, a dataset too small for one optimizer step. With
    ``lookahead`` the next step's micro-batches are loaded in a background thread while the caller
    trains on this one: for data that waits on I/O, such as a served teacher's top-k rows.
    """

    def __init__(self, dataset, *, batch_size: int, collate_fn, seed: int, shuffle: bool = True,
                 gradient_accumulation_steps: int = 1, max_steps_per_epoch: int | None = None,
                 dist: Distribution | None = None, lookahead: bool = False):
        dist = dist or Distribution()
        per_step = batch_size * gradient_accumulation_steps * dist.world_size
        if len(dataset) == 0:
            raise KDTuneError("dataset: no samples")
        if len(dataset) < per_step:
            raise KDTuneError(f"dataset: {len(dataset)} samples are fewer than one optimizer step needs ({per_step}: "
                              f"batch_size x gradient_accumulation_steps x processes)")
        self.sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=dist.rank,
                                        world_size=dist.world_size)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, collate_fn=collate_fn,
                                 drop_last=True)
        self.accumulation = gradient_accumulation_steps
        whole = self.sampler.epoch_length // (batch_size * gradient_accumulation_steps)
        self.steps_per_epoch = min(whole, max_steps_per_epoch) if max_steps_per_epoch else whole
        self.lookahead = lookahead

    def epoch(self, state: TrainingState) -> Iterator[list[dict]]:
        """The rest of epoch ``state.epoch``, one optimizer step's micro-batches at a time.

        ``state.step_in_epoch`` and ``state.global_step`` count each step as it is handed out (in
        the loop body they number the step being taken); when the epoch is exhausted,
        ``state.epoch`` counts it and ``step_in_epoch`` returns to 0.
        """
        self.sampler.set_position(state.epoch, state.step_in_epoch * self.accumulation * self.loader.batch_size)
        batches = iter(self.loader)

        def take():
            return [next(batches) for _ in range(self.accumulation)]

        with ThreadPoolExecutor(1, thread_name_prefix="lookahead") as pool:
            upcoming = pool.submit(take) if self.lookahead else None
            while state.step_in_epoch < self.steps_per_epoch:
                micro = upcoming.result() if upcoming else take()
                if self.lookahead and state.step_in_epoch + 1 < self.steps_per_epoch:
                    upcoming = pool.submit(take)  # the next step's, loading while this one trains
                state.step_in_epoch += 1
                state.global_step += 1
                yield micro
        state.epoch, state.step_in_epoch = state.epoch + 1, 0


def validation_batches(dataset, *, batch_size: int, collate_fn, max_batches: int | None = None,
                       dist: Distribution | None = None) -> list[dict]:
    """This process's share of the held-out data, in order: sample ``i`` goes to rank
    ``i % world_size``, and every rank gets as many batches as the others (a rank short of samples
    repeats its last one with every label ignored, which adds nothing), so the summed losses over
    all ranks equal those of one process on the whole set. ``max_batches`` caps the batches per
    process: the first ``max_batches * batch_size * world_size`` samples."""
    dist = dist or Distribution()
    if len(dataset) == 0:
        raise KDTuneError("validation.dataset: no samples")
    total = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size * dist.world_size)
    mine = list(range(dist.rank, total, dist.world_size))
    padding = -(-total // dist.world_size) - len(mine)
    indices = mine + [mine[-1] if mine else 0] * padding
    batches = []
    fetch = getattr(dataset, "__getitems__", None)  # a whole batch at once where the dataset can
    for first in range(0, len(indices), batch_size):
        chosen = indices[first: first + batch_size]
        batch = collate_fn(fetch(chosen) if fetch else [dataset[i] for i in chosen])
        for row in range(batch["labels"].shape[0]):
            if first + row >= len(mine):  # a repeated sample: scored by no one
                batch["labels"][row] = IGNORE_INDEX
        batches.append(batch)
    return batches


def longest_sample(dataset) -> int:
    """The most tokens any sample of ``dataset`` holds (a prompt sample: prompt and reply)."""
    own = getattr(dataset, "longest", None)
    if own is not None:
        return own
    if hasattr(dataset, "dataset"):  # a dataset joined with something (a teacher cache)
        return longest_sample(dataset.dataset)
    longest = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        size = len(sample["tokens"]) if "tokens" in sample else len(sample["prompt"]) + len(sample["completion"])
        longest = max(longest, size)
    return longest


def check_positions(dataset, *checkpointers, extra: int = 0, key: str = "dataset") -> None:
    """Refuse, before any weight loads, samples (plus ``extra`` generated tokens) longer than a
    model's ``max_position_embeddings``: it was never trained on such positions."""
    longest = longest_sample(dataset) + extra
    setting = getattr(dataset, "max_seq_len", None)  # a limit the model could never train to is a mistake too
    for checkpointer in checkpointers:
        limit = checkpointer.model_args.max_position_embeddings
        if setting is not None and setting > limit:
            raise KDTuneError(f"{key}.max_seq_len: {setting} is past max_position_embeddings={limit} of "
                              f"{checkpointer.checkpoint_dir}/config.json; set it to at most {limit}")
        if longest > limit:
            what = f"{longest} tokens" + (f" with the {extra} generated" if extra else "")
            raise KDTuneError(f"{key}: a sample of {what} exceeds max_position_embeddings={limit} of "
                              f"{checkpointer.checkpoint_dir}/config.json; lower max_seq_len (or max_new_tokens)")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors (and a cached teacher's top-k) on ``device``; other values as they are."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device)
        elif isinstance(value, TeacherTopK):
            value = TeacherTopK(value.logprobs.to(device), value.ids.to(device))
        elif hasattr(value, "spans"):  # an AlignedTeacher (a served teacher of another tokenizer)
            value = value.to(device)
        moved[key] = value
    return moved


def build_validation(cfg, settings, tokenizer, collate_fn, dist: Distribution, join=None,
                     dataset_args: dict | None = None) -> list[dict] | None:
    """The ``validation`` node's batches for this process (see `validation_batches`), or None;
    ``join`` wraps the dataset first (a served teacher's rows); ``dataset_args`` go to the dataset
    component beside the tokenizer (the teacher's tokenizer)."""
    if settings.validation is None:
        return None
    from kdtune.config import instantiate

    dataset = instantiate(cfg.validation.dataset, tokenizer=tokenizer, **(dataset_args or {}))
    if join is not None:
        dataset = join(dataset)
    return validation_batches(dataset, batch_size=settings.validation.batch_size or settings.batch_size,
                              collate_fn=collate_fn, max_batches=settings.validation.max_batches, dist=dist)
