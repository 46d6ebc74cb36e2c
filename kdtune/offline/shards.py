"""The shard files of a teacher cache: how top-k rows are stored, written atomically and read back.

A shard is one safetensors file holding the rows of a run of consecutive samples:
``logprobs [rows, k]`` and ``ids [rows, k, id_bytes]``. Log-probabilities are float16 by default,
rounded toward -inf so that the stored probabilities of a row never sum to more than the true ones
(the loss's tail bucket, 1 − Σ p, stays non-negative); float32 keeps them exact. Ids are stored as
little-endian uint8 bytes, as few as the vocabulary needs: 2 up to 65,536 tokens, 3 up to 16.7M
(Qwen's 151,665 and Llama 3's 128,256). At k = 64 a 150k-vocabulary token costs 64 × (2 + 3) = 320 bytes.
"""

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LOGPROB_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


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


def write_shard(path: Path, logprobs: torch.Tensor, ids: torch.Tensor) -> None:
    """Write a shard so that it exists complete or not at all (a killed run leaves only a ``.tmp``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"logprobs": logprobs.contiguous(), "ids": ids.contiguous()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardReader:
    """Row ranges of a cache's shards, read lazily through memory maps (opened on first use)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._open: dict[str, object] = {}

    def rows(self, shard: str, offset: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored log-probabilities ``[count, k]`` and decoded ids ``[count, k]`` (int64)."""
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        f = self._open[shard]
        rows = slice(offset, offset + count)
        return f.get_slice("logprobs")[rows], decode_ids(f.get_slice("ids")[rows])
