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


# (device, dtype, weight shape, rows, threads) -> {form: seconds a call}, plus "setup": seconds to pack
_HEADS: dict[tuple, dict[str, float]] = {}
# The packed form's copy of the weight may take at most this share of the memory available when a
# `generate` call starts (Qwen2.5-0.5B's head in fp32: 545 MB; a 7B model's, 2.2 GB).
PACKED_MEMORY_SHARE = 0.25


def _copy_fits(weight: torch.Tensor) -> bool:
    from kdtune.training.memory import free_bytes  # here: kdtune.training imports this module

    available = free_bytes(weight.device)
    return available is None or weight.numel() * weight.element_size() <= PACKED_MEMORY_SHARE * available


def _packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and type(weight) is torch.Tensor
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def output_head(weight: torch.Tensor, rows: int, steps: int = 1):
    """The decode step's output projection for ``steps`` calls: a function ``h [rows, d] -> logits
    [rows, V]`` in the weight's dtype, valid until the next call (a buffer is reused), in the layout
    its form makes: row-major, or vocabulary-major (a transposed view; `sample_next` takes either,
    and greedy choice then needs no copy).

    Forms of the same product, each timed once per shape, and the one with the least time for
    ``steps`` calls kept: ``F.linear`` ("linear"); the vocabulary-major ``weight @ h.T``
    ("vocab-major"); the vocabulary cut into one block per thread as one batched product ("blocks"),
    each thread running a whole single-threaded GEMM; and, on the CPU, the weight packed once into
    oneDNN's blocked layout ("packed": the packing that inductor's weight freezing does, paid once
    per call of this function, a copy of the weight held while it lasts, and only where that copy takes
    at most ``PACKED_MEMORY_SHARE`` of the memory available). A plain GEMM with 8 rows
    re-packs the whole weight every call; on this project's CPUs the forms differ by up to 2.5x
    (docs/performance.md, "Sampling").
    """
    vocab, width = weight.shape
    device, threads = weight.device, torch.get_num_threads()

    def make(form):
        if form == "linear":
            logits = torch.empty(rows, vocab, dtype=weight.dtype, device=device)
            return lambda h: torch.mm(h, weight.T, out=logits)
        if form == "packed":
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            return lambda h: torch.ops.mkldnn._linear_pointwise(h.contiguous(), packed, None, "none", [], "")
        blocks = threads if form == "blocks" else 1
        per_block = weight.view(blocks, vocab // blocks, width)  # splitting the vocabulary: a view of any strides
        columns = torch.empty(blocks, vocab // blocks, rows, dtype=weight.dtype, device=device)

        def in_columns(h):  # [V, rows] in memory: the logits as a transposed view, not copied
            torch.bmm(per_block, h.T.expand(blocks, width, rows), out=columns)
            return columns.view(vocab, rows).T
        return in_columns

    key = (device, weight.dtype, tuple(weight.shape), rows, threads)
    if key not in _HEADS:
        _HEADS[key] = _time_forms(make, weight, rows, threads)
    seconds = _HEADS[key]
    if "packed" in seconds and not _copy_fits(weight):  # memory now, not when the forms were timed
        seconds = {form: s for form, s in seconds.items() if form not in ("packed", "setup")}
    return make(_cheapest(seconds, steps))


def _cheapest(seconds: dict[str, float], steps: int) -> str:
    """The form with the least time for ``steps`` calls, packing included."""
    return min((f for f in seconds if f != "setup"),
               key=lambda f: steps * seconds[f] + (seconds["setup"] if f == "packed" else 0.0))


def _time_forms(make, weight, rows, threads) -> dict[str, float]:
    def clock(fn):
        start = time.perf_counter()
        result = fn()
        if weight.device.type == "cuda":
            torch.cuda.synchronize(weight.device)
        return time.perf_counter() - start, result

    blocks = threads > 1 and weight.shape[0] % threads == 0
    names = ["linear", "vocab-major"] + ["blocks"] * blocks
    forms = {name: make(name) for name in names}
    seconds = {}
    h = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    if _packable(weight) and _copy_fits(weight):
        try:
            seconds["setup"], packed = clock(lambda: make("packed"))
            packed(h)  # a oneDNN build that packs but cannot multiply fails here
            forms["packed"] = packed
        except RuntimeError:  # the other forms remain
            seconds.pop("setup", None)
    calls = {}
    for _ in range(4):  # alternating, the best of 3 each after a first call: timings are noisy
        for name, form in forms.items():
            calls.setdefault(name, []).append(clock(lambda: form(h))[0])
    return seconds | {name: min(times[1:]) for name, times in calls.items()}


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
    project, cap = output_head(weight, batch, max_new_tokens), model.args.final_logit_softcapping
    head = project if cap is None else (lambda h: softcap(project(h).float(), cap))  # capped in float32
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
