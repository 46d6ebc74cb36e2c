"""Batches in a reproducible order that a resumed run can pick up mid-epoch.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a run resumed at step
``k`` of an epoch skips exactly the samples the interrupted run had consumed and sees the same
batches afterwards. Under data parallelism each rank takes every ``world_size``-th index.
"""

import torch
from torch.utils.data import DataLoader, Sampler


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


def build_dataloader(dataset, *, batch_size: int, shuffle: bool, seed: int, collate_fn,
                     rank: int = 0, world_size: int = 1) -> DataLoader:
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True)
