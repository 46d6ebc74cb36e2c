"""Prompts for on-policy distillation: the student writes the replies, the teacher grades them.

A sample is ``{"prompt": ids, "completion": ids}``: the prompt rendered by the chat template with
the generation prompt (what generation continues from), and the reference reply with its
end-of-turn token when the row has one (``[]`` otherwise), for the supervised share of the steps.
`prompt_completion_sample` turns a prompt and any completion, generated or not, into a training
sample.
"""

import warnings

import numpy as np

from kdtune.config.checks import argument_checks, boolean, choice, integer
from kdtune.datasets.messages import STYLES, chat_messages
from kdtune.datasets.rows import convert_rows, field, load_rows
from kdtune.datasets.sft import IGNORE_INDEX
from kdtune.errors import KDTuneError


class PromptDataset:
    """Map-style dataset of ``{"prompt", "completion"}`` samples (see the module docstring), with
    ``teacher_prompt`` (the prompt in the teacher's template and tokens) when a teacher of another
    tokenizer grades the completions."""

    def __init__(self, samples: list[tuple[list[int], list[int]]], teacher_prompts: list[list[int]] | None = None):
        self._samples = samples
        self._teacher_prompts = teacher_prompts

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict:
        prompt, completion = self._samples[index]
        if self._teacher_prompts is None:
            return {"prompt": prompt, "completion": completion}
        return {"prompt": prompt, "completion": completion, "teacher_prompt": self._teacher_prompts[index]}


def prompt_messages(data: dict, style: str = "auto") -> list[dict]:
    """A row's conversation: a ``prompt`` column (plus an optional ``completion``), else a chat row."""
    if "prompt" not in data:
        return chat_messages(data, style)
    messages = [{"role": "user", "content": field(data, "prompt")}]
    if data.get("completion") is not None:
        messages.append({"role": "assistant", "content": field(data, "completion")})
    return messages


@argument_checks(max_prompt_len=integer(1, optional=True), conversation_style=choice(*STYLES),
                 skip_bad_rows=boolean())
def prompt_dataset(
    tokenizer,
    *,
    source: str = "json",
    data_files=None,
    split: str = "train",
    column_map: dict | None = None,
    conversation_style: str = "auto",
    max_prompt_len: int | None = None,
    skip_bad_rows: bool = False,
    teacher_tokenizer=None,
) -> PromptDataset:
    """Prompts of a ``prompt``/``completion`` file or of chat rows (a final assistant turn is the reference).

    Prompts longer than ``max_prompt_len`` tokens are dropped, and counted in one warning. With
    ``teacher_tokenizer`` each prompt is also rendered in the teacher's template and encoded by its
    tokenizer (``teacher_prompt``).
    """
    if conversation_style not in STYLES:
        raise KDTuneError(f"conversation_style: expected one of {STYLES}, got {conversation_style!r}")
    template = tokenizer.require_chat_template()

    def render(data: dict):
        messages = prompt_messages(data, conversation_style)
        if messages[-1]["role"] != "assistant":
            return template.render(messages, add_generation_prompt=True), []
        if len(messages) == 1:
            raise KDTuneError("the conversation has no prompt before the assistant's reply")
        return template.render_with_spans(messages, train_on="last")

    teacher_template = None if teacher_tokenizer is None else teacher_tokenizer.require_chat_template()

    def teacher_prompt(data: dict) -> str:
        messages = prompt_messages(data, conversation_style)
        messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        return teacher_template.render(messages, add_generation_prompt=True)

    rows = load_rows(source, data_files, split, column_map)
    converted = convert_rows(rows, render, skip_bad_rows)
    rendered = [value for _, value in converted]
    samples = []
    for ids, mask in tokenizer.tokenize_rendered(rendered) if rendered else []:
        trained = np.flatnonzero(mask)
        prompt = ids[: trained[0]] if len(trained) else ids
        samples.append((prompt.tolist(), ids[trained].tolist()))
    teacher_prompts = None if teacher_tokenizer is None else \
        [e.ids for e in teacher_tokenizer.encodings([teacher_prompt(row.data) for row, _ in converted])]
    keep = [max_prompt_len is None or len(s[0]) <= max_prompt_len for s in samples]
    kept = [s for s, k in zip(samples, keep) if k]
    name = f"prompt dataset {source} {data_files or ''}".strip()
    if not kept:
        limit = f" of at most max_prompt_len={max_prompt_len} tokens" if samples else ""
        raise KDTuneError(f"{name}: no prompts{limit}")
    if len(kept) < len(samples):
        dropped = len(samples) - len(kept)
        warnings.warn(f"{name}: dropped {dropped} prompts longer than {max_prompt_len} tokens", stacklevel=2)
    return PromptDataset(kept, None if teacher_prompts is None else [t for t, k in zip(teacher_prompts, keep) if k])


def prompt_completion_sample(prompt: list[int], completion: list[int]) -> dict:
    """The training sample of ``prompt`` followed by ``completion``: only the completion is learned."""
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + list(completion) + [IGNORE_INDEX]
    return {"tokens": list(prompt) + list(completion), "labels": labels}
