"""Distilling from a teacher cache: each training sample joined with its cached top-k rows, and the
collate that pads them into the batch's ``teacher_topk``.

The cache is checked against the training run's tokenizer, dataset and temperature when it is
opened, so rows can only ever be joined to the samples they were computed for. Packed datasets
work as long as the cache was made from the same packed dataset (the hash covers the packing).
"""

from pathlib import Path

import torch

from kdtune.datasets import IGNORE_INDEX, collate
from kdtune.datasets.fingerprint import fingerprint
from kdtune.errors import KDTuneError
from kdtune.losses import TeacherTopK
from kdtune.offline.index import check_matches, read_index
from kdtune.offline.shards import ShardReader


class CachedTeacherDataset:
    """``dataset``'s samples plus ``teacher_logprobs`` ``[n, k]`` and ``teacher_ids`` ``[n, k]`` for
    their n trained positions, from the cache at ``folder`` (checked to match on construction)."""

    def __init__(self, dataset, folder, *, tokenizer, temperature: float):
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None:
            raise KDTuneError(f"teacher_logits_cache: '{self.folder}' holds no teacher cache (no index.json); "
                              f"make one with the cache_teacher_logits recipe")
        if not index["complete"]:
            raise KDTuneError(f"teacher_logits_cache: the cache in '{self.folder}' is incomplete; rerun "
                              f"cache_teacher_logits with the same config to finish it")
        check_matches(index, self.folder, tokenizer=tokenizer, dataset=dataset, temperature=temperature)
        self.dataset, self._shards, self._samples = dataset, index["shards"], index["samples"]
        self._reader = ShardReader(self.folder, storage=index["logprob_dtype"], top_k=index["top_k"],
                                   vocab_size=index["vocab_size"])

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        """The samples' (the cache was checked to match them on opening)."""
        return fingerprint(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        shard, offset, count = self._samples[index]
        logprobs, ids = self._reader.rows(self._shards[shard], offset, count)
        return {**sample, "teacher_logprobs": logprobs, "teacher_ids": ids}


def join_teacher_cache(dataset, cache_dir, *, tokenizer, temperature: float):
    """The dataset and collate function to train on: ``dataset`` and `collate` without a cache;
    with one, its samples joined with their cached rows and batches carrying ``teacher_topk``."""
    if not cache_dir:
        return dataset, collate
    return CachedTeacherDataset(dataset, cache_dir, tokenizer=tokenizer, temperature=temperature), \
        collate_with_teacher_topk


def collate_with_teacher_topk(samples: list[dict], pad_id: int) -> dict:
    """`collate`, plus ``teacher_topk``: a :class:`TeacherTopK` ``[B, S, k]`` whose rows at trained
    positions are the samples' cached rows (elsewhere log-probability 0 and id 0, never read)."""
    batch = collate(samples, pad_id)
    logprobs, ids = (torch.cat([s[key] for s in samples]) for key in ("teacher_logprobs", "teacher_ids"))
    batch["teacher_topk"] = rows_at(batch["labels"] != IGNORE_INDEX, logprobs, ids)
    return batch


def rows_at(trained: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor) -> TeacherTopK:
    """A :class:`TeacherTopK` ``[B, S, k]`` holding the rows ``[N, k]`` at the N positions where
    ``trained`` ``[B, S]`` is True, in row-major order (elsewhere log-probability 0 and id 0, never read)."""
    full_logprobs = logprobs.new_zeros(*trained.shape, logprobs.shape[-1])
    full_ids = ids.new_zeros(*trained.shape, ids.shape[-1])
    full_logprobs[trained], full_ids[trained] = logprobs, ids
    return TeacherTopK(full_logprobs, full_ids)
