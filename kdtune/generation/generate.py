"""Batched generation from the native decoder with a KV cache."""

from __future__ import annotations

from collections.abc import Iterable
import time
from dataclasses import dataclass

import torch

from kdtune.datasets import IGNORE_INDEX
from kdtune.errors import KDTuneError
from kdtune.generation.masks import padded_attention_mask, padded_positions
from kdtune.generation.sampling import sample_next
from kdtune.models.decoder import TransformerDecoder
from kdtune.modules.softcap import softcap


@dataclass
class GenerationOutput:
    """Prompts and completions, as id lists and as one padded batch ready to be scored.

    ``sequences`` ``[B, P + T]``: row ``i`` is its prompt left-padded to width ``P``
    (``prompt_width``), then its completion, then ``pad_id`` up to ``T``, the longest completion.
    A completion ends with its stop token when one was produced (``stopped``) and holds nothing
    after it.
    """

    sequences: torch.Tensor
    prompt_width: int
    prompt_lens: torch.Tensor
    completion_lens: torch.Tensor
    stopped: torch.Tensor
    completions: list[list[int]]

    def _columns(self) -> torch.Tensor:
        return torch.arange(self.sequences.shape[1], device=self.sequences.device)[None, :]

    @property
    def completion_mask(self) -> torch.Tensor:
        """``[B, P + T]`` True on completion tokens, up to and including the stop token."""
        offset = self._columns() - self.prompt_width
        return (offset >= 0) & (offset < self.completion_lens[:, None])

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, P + T]`` True on real tokens (prompt and completion), False on padding."""
        prompt = self._columns() >= self.prompt_width - self.prompt_lens[:, None]
        return (prompt & (self._columns() < self.prompt_width)) | self.completion_mask

    @property
    def input_pos(self) -> torch.Tensor:
        """RoPE positions ``[B, P + T]`` for a forward over ``sequences``."""
        return padded_positions(self.token_mask)

    def attention_mask(self) -> torch.Tensor:
        """The ``[B, P + T, P + T]`` mask for a forward over ``sequences``: causal, padding hidden."""
        return padded_attention_mask(self.token_mask)

    def labels(self) -> torch.Tensor:
        """Next-token targets ``[B, P + T]`` in the dataset convention: ``labels[:, i]`` is the
        token at ``i + 1`` when that is a completion token, else ``IGNORE_INDEX``. So completions up
        to and including the stop token are trained; prompts, padding and the last column are not."""
        labels = torch.full_like(self.sequences, IGNORE_INDEX)
        target = self.completion_mask[:, 1:]
        labels[:, :-1] = torch.where(target, self.sequences[:, 1:], IGNORE_INDEX)
        return labels


def _check(prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if not prompts:
        raise KDTuneError("generate: no prompts given")
    empty = next((i for i, p in enumerate(prompts) if len(p) == 0), None)
    if empty is not None:
        raise KDTuneError(f"generate: prompt {empty} is empty; every prompt needs at least one token")
    if max_new_tokens < 1:
        raise KDTuneError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise KDTuneError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise KDTuneError(f"top_k: must be at least 1 or null, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise KDTuneError(f"top_p: must be in (0, 1] or null, got {top_p}")


def generate(
    model: TransformerDecoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Complete every prompt (token ids) by up to ``max_new_tokens`` tokens.

    Prompts are left-padded into one batch, so every row's next token comes from the same column;
    each row's positions start at 0 on its first real token. With ``use_cache`` the whole batch is
    prefilled in one forward and then fed one token per step through the model's KV cache;
    without, every step reruns the full sequence (the reference the cache is tested against).
    A row stops at its first token in ``stop_ids``; generation ends when all rows have.

    ``temperature`` 0 is greedy; otherwise tokens are drawn from the tempered distribution cut to
    ``top_k`` / ``top_p`` (see `filter_logits`), reproducibly for a given ``generator`` (which must
    live on the model's device). ``vocab_size`` (e.g. the tokenizer's) excludes the padding rows
    of a larger embedding. The model runs in eval mode under ``torch.inference_mode()``; its
    train/eval modes are restored and its KV caches removed afterwards.
    """
    _check(prompts, max_new_tokens, temperature, top_k, top_p)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            sequences, prompt_lens, completion_lens, stopped = _generate(
                model, prompts, max_new_tokens, torch.tensor(sorted(set(stop_ids)), dtype=torch.long), pad_id,
                dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator),
                vocab_size, use_cache,
            )
    finally:
        if use_cache:
            model.remove_caches()
        for module, training in modes.items():
            module.train(training)
    # Clones leave inference mode, so the batch can feed a forward that is backpropagated.
    sequences, prompt_lens, completion_lens, stopped = (
        t.clone() for t in (sequences, prompt_lens, completion_lens, stopped)
    )
    width = max(len(p) for p in prompts)
    completions = [row[width : width + n].tolist() for row, n in zip(sequences, completion_lens.tolist())]
    return GenerationOutput(sequences, width, prompt_lens, completion_lens, stopped, completions)


_HEADS: dict[tuple, bool] = {}  # (device, dtype, weight shape, rows) -> whether weight @ h.T is faster


def output_head(weight: torch.Tensor, rows: int):
    """The decode step's output projection ``h [rows, d] -> logits [rows, V]``, in the faster of two
    orientations of the same product, timed once per shape: on this CPU MKL computes a few float32
    rows against a 152k-row vocabulary 1.6x faster as ``weight @ h.T``, bf16 ones 1.6x faster as
    ``F.linear(h, weight)``."""
    key = (weight.device, weight.dtype, tuple(weight.shape), rows)
    if key not in _HEADS:
        h = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        seconds = {}
        for _ in range(3):  # alternating, the best of 3 each after a first call: timings are noisy
            for transposed in (True, False):
                start = time.perf_counter()
                (weight @ h.T).T if transposed else torch.nn.functional.linear(h, weight)
                if weight.device.type == "cuda":
                    torch.cuda.synchronize(weight.device)
                seconds.setdefault(transposed, []).append(time.perf_counter() - start)
        seconds = {k: min(v[1:]) for k, v in seconds.items()}
        _HEADS[key] = seconds[True] < seconds[False]
    if _HEADS[key]:
        return lambda h: (weight @ h.T).T
    return lambda h: torch.nn.functional.linear(h, weight)


def _generate(model, prompts, max_new_tokens, stop_ids, pad_id, sampling, vocab_size, use_cache):
    device = model.output_weight.device
    batch, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    sequences = torch.full((batch, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        sequences[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
    sequences = sequences.to(device)  # one copy to the device, not one per row
    # Every slot after the prompts counts as real: a row that has stopped is fed padding that
    # nothing of interest ever attends to.
    real = torch.arange(total, device=device)[None, :] >= (width - prompt_lens)[:, None]
    positions = padded_positions(real)
    stop_ids = stop_ids.to(device)
    weight = model.output_weight[:vocab_size]  # merged once for a LoRA output layer
    project, cap = output_head(weight, batch), model.args.final_logit_softcapping
    head = project if cap is None else (lambda h: softcap(project(h), cap))
    if use_cache:
        model.setup_caches(batch, total - 1)  # the last token is returned, never fed

    completion_lens = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        start, end = (model.cache_size if use_cache else 0), width + step
        hidden = model(
            sequences[:, start:end],
            mask=padded_attention_mask(real, start, end),
            input_pos=positions[:, start:end],
            return_hidden=True,
        )
        token = sample_next(head(hidden[:, -1]), **sampling)
        sequences[:, end] = torch.where(stopped, pad_id, token)
        completion_lens += ~stopped
        stopped |= torch.isin(token, stop_ids)
        if stopped.all():
            break
    return sequences[:, : width + completion_lens.max().item()], prompt_lens, completion_lens, stopped
