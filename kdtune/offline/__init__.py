"""Offline distillation: cache the teacher's top-k log-probabilities once, then distill from the
cache without the teacher in memory."""

from kdtune.offline.dataset import (
    CachedTeacherDataset,
    collate_with_teacher_topk,
    join_teacher_cache,
)
from kdtune.offline.index import DatasetSummary, check_matches, read_index, summarize_dataset
from kdtune.offline.shards import decode_ids, encode_ids, id_bytes, store_logprobs
from kdtune.offline.writer import CacheWriter, teacher_topk

__all__ = [
    "CacheWriter",
    "CachedTeacherDataset",
    "DatasetSummary",
    "check_matches",
    "collate_with_teacher_topk",
    "decode_ids",
    "encode_ids",
    "id_bytes",
    "join_teacher_cache",
    "read_index",
    "store_logprobs",
    "summarize_dataset",
    "teacher_topk",
]
