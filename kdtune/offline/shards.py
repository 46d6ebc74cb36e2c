"""The shard files of a teacher cache: how top-k rows are stored, written atomically and read back.

A shard is one safetensors file holding the rows of a run of consecutive samples, in one of three
storages (the index's ``logprob_dtype``):

- ``q8`` (the default): ``mass [rows]``, ``span [rows]``, ``codes [rows, (k + 255) / 8]`` and
  ``ids [rows, k * id_bits / 8]``, described in `kdtune.offline.packing`: 192 bytes a token at
  k = 64 and a 152k vocabulary, each log-probability within 1/127 of its row's span of the true one.
- ``fp16``: ``logprobs [rows, k]`` rounded toward -inf, so that the stored probabilities of a row
  never sum to more than the true ones, and ``ids [rows, k, id_bytes]`` as little-endian bytes, as
  few as the vocabulary needs (3 for 152k tokens): 320 bytes a token at k = 64.
- ``fp32``: the same with exact float32 log-probabilities, 448 bytes a token.
"""

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdtune.offline.packing import dequantize, id_bits, pack_ids, quantize, unpack_ids

LOGPROB_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
STORAGES = ("q8", *LOGPROB_DTYPES)


def id_bytes(vocab_size: int) -> int:
    """Bytes per stored id: enough for ``vocab_size - 1``."""
    return max(1, ((vocab_size - 1).bit_length() + 7) // 8)


def encode_ids(ids: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Ids ``[..., k]`` → uint8 ``[..., k, nbytes]``, least significant byte first."""
    return torch.stack([(ids >> (8 * j)) & 0xFF for j in range(nbytes)], dim=-1).to(torch.uint8)


def decode_ids(raw: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., k, nbytes]`` → int64 ids ``[..., k]``."""
    ids = raw[..., 0].long()
    for j in range(1, raw.shape[-1]):
        ids |= raw[..., j].long() << (8 * j)
    return ids


def store_logprobs(logprobs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 log-probabilities to the storage dtype, rounding toward -inf."""
    stored = logprobs.to(dtype)
    if dtype == logprobs.dtype:
        return stored
    above = stored.to(logprobs.dtype) > logprobs
    return torch.where(above, torch.nextafter(stored, torch.full_like(stored, float("-inf"))), stored)


def encode_rows(logprobs: torch.Tensor, ids: torch.Tensor, storage: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """Float32 top-k log-probabilities (sorted, decreasing) and their ids ``[N, k]`` → the tensors
    ``storage`` keeps of them, each with one leading row per token."""
    if storage == "q8":
        mass, span, codes = quantize(logprobs)
        return {"mass": mass, "span": span, "codes": codes, "ids": pack_ids(ids, id_bits(vocab_size))}
    return {"logprobs": store_logprobs(logprobs, LOGPROB_DTYPES[storage]), "ids": encode_ids(ids, id_bytes(vocab_size))}


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a shard so that it exists complete or not at all (a killed run leaves only a ``.tmp``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardReader:
    """Row ranges of a cache's shards, read lazily through memory maps (opened on first use)."""

    def __init__(self, folder: Path, *, storage: str, top_k: int, vocab_size: int):
        self.folder, self.storage, self.k, self.vocab_size = folder, storage, top_k, vocab_size
        self._open: dict[str, object] = {}

    def rows(self, shard: str, offset: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[count, k]`` (float32 for q8, else as stored) and ids ``[count, k]`` (int64)."""
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        f = self._open[shard]
        rows = slice(offset, offset + count)
        stored = {name: f.get_slice(name)[rows] for name in f.keys()}
        return decode_rows(stored, self.storage, self.k, self.vocab_size)


def decode_rows(stored: dict[str, torch.Tensor], storage: str, k: int, vocab_size: int):
    """`encode_rows` undone: log-probabilities ``[N, k]`` (float32 for q8, else as stored) and ids
    ``[N, k]`` (int64)."""
    if storage == "q8":
        return (dequantize(stored["mass"], stored["span"], stored["codes"], k),
                unpack_ids(stored["ids"], k, id_bits(vocab_size)))
    return stored["logprobs"], decode_ids(stored["ids"])
