"""The index of a teacher cache (``index.json``): what the cache was made from and where each
sample's rows are.

It records the top-k size, temperature, tokenizer (vocabulary size and fingerprint), the tokenized
dataset (a hash of every sample's token ids and labels, so any change to the data, chat template,
tokenizer or ``max_seq_len`` changes it), ``max_seq_len``, the teacher, the storage format, the
shard files, and for sample i its ``[shard, offset, count]``: the ``count`` rows from ``offset`` of
that shard are its trained positions (label != -100) in order. ``complete`` turns true when the
last shard is written; until then a rerun with the same settings resumes.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtune.datasets import IGNORE_INDEX
from kdtune.errors import KDTuneError

INDEX_FILE = "index.json"
FORMAT = "kdtune-teacher-topk-1"


@dataclass(frozen=True)
class DatasetSummary:
    """One pass over a tokenized dataset: its hash, sample lengths and trained positions per sample."""

    hash: str
    lengths: list[int]
    trained: list[int]


def summarize_dataset(dataset) -> DatasetSummary:
    """Hash every field of every sample (tokens, labels, and packing's positions) in dataset order."""
    digest, lengths, trained = hashlib.sha256(), [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        for key in sorted(sample):
            values = np.asarray(sample[key], dtype=np.int64)
            digest.update(f"{key}:{values.size};".encode())
            digest.update(values.tobytes())
        labels = np.asarray(sample["labels"])
        lengths.append(len(labels))
        trained.append(int((labels != IGNORE_INDEX).sum()))
    return DatasetSummary(digest.hexdigest(), lengths, trained)


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard + 1:05d}-of-{num_shards:05d}.safetensors"


def build_index(summary: DatasetSummary, settings: dict, samples_per_shard: int) -> dict:
    """The complete index but for ``complete``, which starts false. Shards hold ``samples_per_shard``
    consecutive samples, so the layout follows from the dataset alone and a resumed run repeats it."""
    if samples_per_shard <= 0:
        raise KDTuneError(f"samples_per_shard: expected a positive integer, got {samples_per_shard}")
    num_samples = len(summary.trained)
    num_shards = -(-num_samples // samples_per_shard)
    samples, offset = [], 0
    for i, count in enumerate(summary.trained):
        offset = 0 if i % samples_per_shard == 0 else offset
        samples.append([i // samples_per_shard, offset, count])
        offset += count
    return {"format": FORMAT, "complete": False, **settings, "dataset_hash": summary.hash,
            "num_samples": num_samples, "num_rows": sum(summary.trained), "samples_per_shard": samples_per_shard,
            "shards": [shard_name(s, num_shards) for s in range(num_shards)], "samples": samples}


def read_index(folder: Path) -> dict | None:
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise KDTuneError(f"{path}: not a kdtune teacher cache index (format {index.get('format')!r}, "
                          f"expected {FORMAT!r})")
    return index


def write_index(folder: Path, index: dict) -> None:
    """Replace ``index.json`` in one step."""
    tmp = folder / f".{INDEX_FILE}.tmp"
    # The settings one per line for reading; the per-sample table (last, and long) on one line.
    head = json.dumps({k: v for k, v in index.items() if k != "samples"}, indent=1)
    samples = json.dumps(index["samples"], separators=(",", ":"))
    tmp.write_text(f'{head[:-2]},\n "samples": {samples}\n}}\n', encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / INDEX_FILE)


def differences(recorded: dict, wanted: dict) -> list[str]:
    """``key: recorded vs wanted`` for every setting that differs (the layout and progress excluded)."""
    skip = {"complete", "samples", "shards"}
    keys = sorted((set(recorded) | set(wanted)) - skip)
    return [f"{k}: {recorded.get(k)!r} vs {wanted.get(k)!r}" for k in keys if recorded.get(k) != wanted.get(k)]


def check_matches(index: dict, where: Path, *, tokenizer, dataset, temperature: float) -> None:
    """Refuse a cache made with another tokenizer, max_seq_len, temperature or tokenized dataset."""
    if index["vocab_fingerprint"] != tokenizer.vocab_fingerprint:
        raise KDTuneError(
            f"teacher_logits_cache: {where} was made with a different tokenizer (vocabulary of "
            f"{index['vocab_size']} tokens, fingerprint {index['vocab_fingerprint'][:12]}) than this config's "
            f"({tokenizer.vocab_size} tokens, fingerprint {tokenizer.vocab_fingerprint[:12]})")
    max_seq_len = getattr(dataset, "max_seq_len", None)
    if index["max_seq_len"] != max_seq_len:
        raise KDTuneError(f"teacher_logits_cache: {where} was made with max_seq_len={index['max_seq_len']} "
                          f"but this config's dataset has max_seq_len={max_seq_len}")
    if index["temperature"] != temperature:
        raise KDTuneError(f"teacher_logits_cache: {where} holds log-probabilities at temperature "
                          f"{index['temperature']} but kd_loss.temperature is {temperature}")
    summary = summarize_dataset(dataset)
    if index["dataset_hash"] != summary.hash:
        raise KDTuneError(
            f"teacher_logits_cache: {where} was made from a different dataset ({index['num_samples']} samples, "
            f"hash {index['dataset_hash'][:12]}) than this config's ({len(summary.trained)} samples, hash "
            f"{summary.hash[:12]}): the data, chat template or packing differ; rerun cache_teacher_logits "
            f"with this config's dataset")
