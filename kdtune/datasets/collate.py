"""Batching samples into tensors: right padding for training, left padding for generation."""

import torch

from kdtune.datasets.sft import IGNORE_INDEX


def collate(samples: list[dict], pad_id: int, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Pad to the longest row: ``tokens`` and ``labels`` ``[B, S]`` (padding: ``pad_id`` / ignored).

    Samples aligned with a teacher's tokenization (``teacher_tokens``, ``spans``) also give the
    teacher's ``teacher_tokens`` ``[B, T]`` (right-padded; padding is never scored) and ``spans``
    ``[N, 5]``: each span's batch row and its ``[s0, s1, t0, t1]``.

    Packed samples (with ``seq_lens``) also give ``input_pos`` ``[B, S]`` and the block-causal
    ``mask`` ``[B, S, S]`` (True = may attend: same sample, not later), so no token sees another
    sample; any batch padding forms one more segment of its own.
    """
    width = max(len(s["tokens"]) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), ignore_index, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, : len(s["tokens"])] = torch.tensor(s["tokens"], dtype=torch.long)
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"], dtype=torch.long)
    batch = {"tokens": tokens, "labels": labels}
    if "teacher_tokens" in samples[0]:
        teacher = torch.zeros((len(samples), max(len(s["teacher_tokens"]) for s in samples)), dtype=torch.long)
        for i, s in enumerate(samples):
            teacher[i, : len(s["teacher_tokens"])] = torch.tensor(s["teacher_tokens"], dtype=torch.long)
        batch["teacher_tokens"] = teacher
        batch["spans"] = torch.tensor([[i, *span] for i, s in enumerate(samples) for span in s["spans"]],
                                      dtype=torch.long).reshape(-1, 5)
    if "seq_lens" in samples[0]:
        pads = [width - len(s["tokens"]) for s in samples]
        seq_lens = [list(s["seq_lens"]) + ([pad] if pad else []) for s, pad in zip(samples, pads)]
        segments = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in seq_lens])
        batch["input_pos"] = torch.stack([torch.cat([torch.arange(k) for k in n]) for n in seq_lens])
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        batch["mask"] = (segments[:, :, None] == segments[:, None, :]) & causal
    return batch


def collate_prompts(samples: list[dict], pad_id: int) -> dict:
    """Left-padded ``prompt`` ``[B, P]`` with ``prompt_lengths`` ``[B]``, so every prompt ends where
    generation starts; ``completions`` (and ``teacher_prompts``, when the samples have them) stay
    lists of id lists."""
    width = max(len(s["prompt"]) for s in samples)
    prompt = torch.full((len(samples), width), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        prompt[i, width - len(s["prompt"]) :] = torch.tensor(s["prompt"], dtype=torch.long)
    lengths = torch.tensor([len(s["prompt"]) for s in samples], dtype=torch.long)
    batch = {"prompt": prompt, "prompt_lengths": lengths, "completions": [s["completion"] for s in samples]}
    if "teacher_prompt" in samples[0]:  # the prompts in a teacher's own template and tokens
        batch["teacher_prompts"] = [s["teacher_prompt"] for s in samples]
    return batch
