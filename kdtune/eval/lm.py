"""A kdtune model as an lm-eval ``LM``, so any harness task scores it.

Tokenization follows lm-eval's Hugging Face backend (``TemplateLM`` splits context and continuation
the same way, rolling windows and stop-sequence handling come from lm-eval itself), so scores
match that backend on the same checkpoint. Requests run longest first in batches of
``batch_size``: each batch is padded only to its own longest row, and memory needs are known
after the first batch.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from kdtune.errors import KDTuneError
from kdtune.generation import generate
from kdtune.modules.softcap import softcap
from kdtune.tokenization import Tokenizer

# Scored positions projected to the vocabulary at once: bounds the [positions, vocab] logits.
_PROJECTION_CHUNK = 1024

# Generation settings of a task's ``generation_kwargs`` that kdtune's sampler understands.
_SAMPLING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


class KDTuneLM(TemplateLM):
    """lm-eval's view of a kdtune decoder and its tokenizer.

    Args:
        model: a kdtune ``TransformerDecoder`` (LoRA layers allowed), on its device.
        tokenizer: the checkpoint's `kdtune.tokenization.Tokenizer`.
        batch_size: rows per forward pass (scoring) or per generation batch.
        max_length: longest input in tokens; longer inputs lose tokens on the left, as in lm-eval.
            Default: the checkpoint's ``max_position_embeddings``.
        max_gen_toks: new tokens per generation when a task does not say.
        seed: seeds the sampler for tasks that sample (greedy decoding ignores it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise KDTuneError(f"batch_size: must be a positive integer, got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.args.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self._device = model.embed_tokens.weight.device
        self._generator = torch.Generator(self._device).manual_seed(seed)

    # --- tokenization, as lm-eval's HF backend does it ---------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS, or EOS for models without one."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's own special tokens, unless already there
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    # --- chat formatting (``apply_chat_template=true``) -------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = self.tokenizer.chat_template
        return template.source if chat_template and template is not None else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The rendered conversation. Without a generation prompt lm-eval has prefilled the start
        of the answer as a final assistant message, so the text ends right after its content
        (the template's end-of-turn dropped), as the HF backend's ``continue_final_message`` does."""
        text = self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        content = chat_history[-1]["content"] if chat_history else ""
        if add_generation_prompt or not content.strip():
            return text
        start = text.rindex(content.strip())
        kept = content.lstrip()  # with its trailing whitespace, where the template kept that
        return text[: start + (len(kept) if text.startswith(kept, start) else len(content.strip()))]

    # --- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy choice) per token pair."""
        rows = []
        for _, context, continuation in requests:
            window = (context + continuation)[-(self.max_length + 1) :]
            rows.append((window[:-1], continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = order[start : start + self.batch_size]
            for i, result in zip(batch, self._score_batch([rows[i] for i in batch])):
                results[i] = result
        return results

    @torch.inference_mode()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # Right padding: causal attention keeps every real position blind to the pad ids.
        tokens = torch.zeros(len(rows), max(len(inputs) for inputs, _ in rows), dtype=torch.long)
        for r, (inputs, _) in enumerate(rows):
            tokens[r, : len(inputs)] = torch.tensor(inputs)
        hidden = self.model(tokens.to(self._device), return_hidden=True)
        # Only the positions that predict continuation tokens are projected to the vocabulary.
        row_idx = torch.cat([torch.full((len(cont),), r) for r, (_, cont) in enumerate(rows)])
        col_idx = torch.cat([torch.arange(len(inputs) - len(cont), len(inputs)) for inputs, cont in rows])
        targets = torch.tensor([t for _, cont in rows for t in cont], device=self._device)
        logprobs, greedy = self._target_logprobs(hidden[row_idx.to(self._device), col_idx.to(self._device)], targets)
        sizes = [len(cont) for _, cont in rows]
        return [
            (float(lp.sum()), bool(g.all()))
            for lp, g in zip(logprobs.double().split(sizes), greedy.split(sizes))
        ]

    def _target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log-softmax of each target (float32) and whether it is the argmax, chunk by chunk."""
        weight = self.model.output_weight
        logprobs, greedy = [], []
        for h, t in zip(hidden.split(_PROJECTION_CHUNK), targets.split(_PROJECTION_CHUNK)):
            logits = softcap(F.linear(h, weight).float(), self.model.args.final_logit_softcapping)
            logprobs.append(logits.log_softmax(-1).gather(1, t[:, None]).squeeze(1))
            greedy.append(logits.argmax(-1) == t)
        return torch.cat(logprobs).cpu(), torch.cat(greedy).cpu()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of ``max_length`` tokens each scored once."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        return totals

    # --- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first of the task's stop strings (``until``)."""
        groups = defaultdict(list)  # one sampler setting per batch
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        results: list = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            until, max_new_tokens, sampling = self._generation_settings(requests[indices[0]].args[1])
            max_prompt = self.max_length - max_new_tokens
            prompts = {i: self.tok_encode(requests[i].args[0])[-max_prompt:] for i in indices}
            stop_ids = self._stop_ids(until)
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                output = generate(
                    self.model,
                    [prompts[i] for i in batch],
                    max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids,
                    pad_id=self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id,
                    generator=self._generator,
                    **sampling,
                )
                for i, ids in zip(batch, output.completions):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    results[i] = postprocess_generated_text(text, until, think_end_token=None)
                progress.update(len(batch))
        progress.close()
        return results

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max new tokens, sampler arguments) of a task's ``generation_kwargs``."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unknown = sorted(set(kwargs) - _SAMPLING_KEYS)
        if unknown:
            raise KDTuneError(
                f"generation_kwargs: {', '.join(unknown)} not supported by kdtune's sampler "
                f"(it reads {', '.join(sorted(_SAMPLING_KEYS))})"
            )
        eos_text = self.tokenizer.decode([self.eot_token_id])
        until = handle_stop_sequences(kwargs["until"], eos=eos_text)
        max_new_tokens = kwargs["max_gen_toks"]
        if max_new_tokens >= self.max_length:
            raise KDTuneError(
                f"max_new_tokens: {max_new_tokens} leaves no room for the prompt within "
                f"max_seq_len = {self.max_length}"
            )
        sampling = {"temperature": 0.0}
        if kwargs["do_sample"] and kwargs["temperature"] > 0:
            sampling = {"temperature": kwargs["temperature"], "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p")}
        return until, max_new_tokens, sampling

    def _stop_ids(self, until: list[str]) -> list[int]:
        """The tokenizer's end ids, plus any stop string that is a single token.

        Stopping on such a token cuts nothing a stop string would keep (its text holds the stop
        string), and spares generating up to ``max_gen_toks`` after a short answer.
        """
        ids = list(self.tokenizer.eos_ids)
        for stop in until:
            encoded = self.tokenizer.encode(stop, add_special_tokens=False) if stop else []
            if len(encoded) == 1 and self.tokenizer.decode(encoded) == stop:
                ids.append(encoded[0])
        return list(dict.fromkeys(ids))
