"""The ``q8`` storage of top-k rows: 192 bytes a token at k = 64 and a 152k vocabulary.

A row's log-probabilities are kept as 8-bit codes of their distance below the row's top value,
square-root companded (``code = round(254 * sqrt((top - logprob) / span))``, ``span`` = top minus
the lowest finite value; 255 stands for -inf), so steps are finest where the probability mass is.
The row's log-sum-exp (its total probability mass) is kept exactly in float32 and the decoded row
is shifted to match it: the loss's tail bucket, ``1 - sum(p)``, is then as accurate as from exact
rows, where rounding each value would otherwise swamp a small tail. Each decoded value is within
``span / 127`` of the true one (at most twice the last step; near the top far closer).

The top-k log-probabilities come sorted, so codes never decrease along a row; they are stored as
the unary code of their increments: a bitmap of ``k + 255`` bits with one set bit per entry, entry
i's code being the position of the i-th set bit minus i, 40 bytes at k = 64 instead of 64. Token
ids are packed at the vocabulary's bit width (18 bits for 152k tokens) instead of whole bytes.
"""

import numpy as np
import torch

LEVELS = 255  # finite codes 0..254; 255 is -inf


def id_bits(vocab_size: int) -> int:
    """Bits per stored id: enough for ``vocab_size - 1``."""
    return max(1, (vocab_size - 1).bit_length())


def pack_ids(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 ids ``[N, k]`` → uint8 ``[N, ceil(k * bits / 8)]``, ``bits`` little-endian bits each."""
    values = ids.numpy().astype(np.int64)
    planes = (values[..., None] >> np.arange(bits)) & 1  # [N, k, bits], least significant first
    return torch.from_numpy(np.packbits(planes.reshape(len(values), -1).astype(np.uint8), axis=1,
                                        bitorder="little"))


def unpack_ids(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """`pack_ids` undone: uint8 ``[N, bytes]`` → int64 ``[N, k]``."""
    planes = np.unpackbits(packed.numpy(), axis=1, count=k * bits, bitorder="little")
    weights = np.left_shift(1, np.arange(bits, dtype=np.int64))
    return torch.from_numpy(planes.reshape(len(planes), k, bits).astype(np.int64) @ weights)


def quantize(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted (decreasing) float32 log-probabilities ``[N, k]`` → ``(mass [N], span [N], codes
    [N, bytes])``: the row's log-sum-exp, its span, and the codes as the unary bitmap above."""
    logprobs = logprobs.float()
    finite = torch.isfinite(logprobs)
    top = logprobs[:, 0]
    if not torch.isfinite(top).all() or (logprobs.diff(dim=1) > 0).any():
        raise ValueError("quantize: each row must be sorted in decreasing order with a finite first entry")
    span = top - torch.where(finite, logprobs, top[:, None]).amin(1)
    depth = (top[:, None] - logprobs) / torch.where(span > 0, span, 1.0)[:, None]
    codes = (depth.clamp(0, 1).sqrt() * (LEVELS - 1)).round().masked_fill_(~finite, LEVELS).long()
    k = codes.shape[1]
    bitmap = torch.zeros(len(codes), k + LEVELS, dtype=torch.uint8)
    bitmap.scatter_(1, codes + torch.arange(k), 1)
    return logprobs.logsumexp(1), span, torch.from_numpy(np.packbits(bitmap.numpy(), axis=1))


def dequantize(mass: torch.Tensor, span: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """`quantize` undone: float32 log-probabilities ``[N, k]`` with the recorded log-sum-exp."""
    bitmap = np.unpackbits(codes.numpy(), axis=1, count=k + LEVELS)
    positions = torch.from_numpy(np.nonzero(bitmap)[1].reshape(len(bitmap), k).astype(np.int64))
    code = positions - torch.arange(k)
    below_top = -span[:, None] * (code.float() / (LEVELS - 1)).square()
    below_top.masked_fill_(code == LEVELS, float("-inf"))
    return below_top + (mass - below_top.logsumexp(1))[:, None]


def bytes_per_row(k: int, vocab_size: int) -> int:
    """Storage of one row: mass and span (float32), the code bitmap, the packed ids."""
    return 8 + -(-(k + LEVELS) // 8) + -(-(k * id_bits(vocab_size)) // 8)
