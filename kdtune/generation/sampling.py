"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` ``[B, V]`` with every token outside the top-k / top-p set at ``-inf``.

    top-k keeps the ``k`` largest logits (ties at the k-th value are all kept). top-p (nucleus)
    keeps the smallest set of most probable tokens whose probability reaches ``top_p``: a token
    stays when the tokens more probable than it hold less than ``top_p`` in total, so the most
    probable token always stays. top-k applies first, top-p to what remains.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_BLOCK = 128  # a power of two: the vocabulary-major path halves blocks


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for ``[B, V]`` logits — each row's first largest value, a NaN counting
    as largest — found through blocks of 128: the first block whose maximum is the row's, then the
    first maximum inside it. The CPU's argmax runs element by element (1.9 ms for 8 float32 rows of
    152k here); the blocks' maxima are one vectorized pass (0.2 ms with the rest). Row-major logits
    and vocabulary-major ones (``logits.T`` contiguous, as the output head's batched forms give them)
    are read where they lie."""
    rows, vocab = logits.shape
    arange = torch.arange(rows, device=logits.device)
    if vocab % _BLOCK == 0 and logits.is_contiguous():
        blocks = logits.view(rows, vocab // _BLOCK, _BLOCK)
        block = blocks.amax(-1).argmax(-1)  # amax keeps a NaN, argmax picks the first NaN or maximum
        return block * _BLOCK + blocks[arange, block].argmax(-1)
    if vocab % _BLOCK == 0 and logits.T.is_contiguous():
        blocks = logits.T.view(vocab // _BLOCK, _BLOCK, rows)
        # each block's maximum by halving (maximum keeps a NaN): element-wise passes over contiguous
        # memory instead of a strided reduction across the middle dimension
        maxima = blocks
        while maxima.shape[1] > 1:
            half = maxima.shape[1] // 2
            maxima = torch.maximum(maxima[:, :half], maxima[:, half:])
        block = maxima[:, 0].argmax(0)
        return block * _BLOCK + blocks[block, :, arange].argmax(-1)
    return logits.argmax(-1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token ``[B]`` for logits ``[B, V]``: the argmax when ``temperature`` is 0, else a
    draw from ``softmax(filter_logits(logits / temperature))``.

    Drawn by inverting each row's cumulative distribution at one uniform number: exact, and one
    random number a row, where ``torch.multinomial`` on the CPU took most of a sampled decode step
    at a 152k vocabulary (docs/performance.md, "Sampling"). The sums are float64, so a token's chance is its
    probability to float32's precision; a token of probability 0 is never drawn."""
    if temperature == 0:  # widening changes no order: the argmax of the logits as they are
        return first_argmax(logits)
    logits = logits.to(torch.float32, memory_format=torch.contiguous_format)
    probs = filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    cumulative = probs.double().cumsum(-1)
    # u < 1 in float32, so u * total < total in float64: the point lies inside the distribution
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device).double()
    token = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).squeeze(-1)
    return token.clamp_max(probs.shape[-1] - 1)
