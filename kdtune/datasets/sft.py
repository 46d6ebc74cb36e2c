"""Tokenized training samples, optionally packed, kept as flat arrays.

Samples are stored as one flat int32 token array and one bool "trained" mask (not Python lists:
those cost ~36 bytes a token) and become ``{"tokens", "labels"}`` dicts on access. Labels are the
next-token targets: ``labels[i] = tokens[i + 1]`` where that token is trained, else -100, and the
last position -100, computed per sample so packing never lets one sample predict the next.

Packing fills rows of exactly ``max_seq_len`` tokens greedily in dataset order; a packed sample
adds ``input_pos`` (restarting at 0 for each sample) and ``seq_lens`` (the lengths of its samples
and of its padding), from which `collate` builds the block-causal attention mask.
"""

import hashlib
from typing import Callable

import numpy as np

from kdtune.config.checks import integer
from kdtune.datasets.rows import Row, convert_rows
from kdtune.errors import KDTuneError, warn
from kdtune.tokenization.chat_template import check_train_on

IGNORE_INDEX = -100


class SFTDataset:
    """Map-style dataset of tokenized samples (usable with a torch DataLoader)."""

    def __init__(
        self,
        samples: list[tuple[np.ndarray, np.ndarray]],
        *,
        packed: bool,
        max_seq_len: int | None,
        pad_id: int,
        name: str,
    ):
        if not samples:
            raise KDTuneError(f"{name}: no samples")
        if not any(mask[1:].any() for _, mask in samples):
            raise KDTuneError(
                f"{name}: every label is masked, so there is nothing to learn; check train_on_input, "
                f"train_on and that max_seq_len leaves room for the responses"
            )
        lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._tokens = np.concatenate([ids for ids, _ in samples])
        self._trained = np.concatenate([mask for _, mask in samples])
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len
        self._packs = None
        if packed:
            if max_seq_len is None:
                raise KDTuneError(f"{name}: packed: true needs max_seq_len")
            self._packs = _greedy_packs(lengths, max_seq_len)

    def fingerprint(self) -> str:
        """A hash of every sample's tokens and trained mask, and of the packing."""
        digest = hashlib.sha256()
        for array in (self._offsets, self._tokens, self._trained, np.asarray(self._packs or [], dtype=np.int64)):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(f"{self.max_seq_len}".encode())
        return digest.hexdigest()

    @property
    def longest(self) -> int:
        """The most tokens a sample (a packed row: ``max_seq_len``) holds."""
        return self.max_seq_len if self._packs is not None else int(np.diff(self._offsets).max())

    @property
    def num_tokens(self) -> int:
        """Tokens in all samples, padding of packed rows excluded."""
        return int(self._offsets[-1])

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._packs is None else len(self._packs) - 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if self._packs is None:
            tokens, labels = self._sample(index)
            return {"tokens": tokens.tolist(), "labels": labels.tolist()}
        parts = [self._sample(i) for i in range(self._packs[index], self._packs[index + 1])]
        seq_lens = [len(tokens) for tokens, _ in parts]
        pad = self.max_seq_len - sum(seq_lens)
        if pad:
            parts.append((np.full(pad, self.pad_id), np.full(pad, IGNORE_INDEX)))
            seq_lens.append(pad)
        return {
            "tokens": np.concatenate([t for t, _ in parts]).tolist(),
            "labels": np.concatenate([lab for _, lab in parts]).tolist(),
            "input_pos": np.concatenate([np.arange(n) for n in seq_lens]).tolist(),
            "seq_lens": seq_lens,
        }

    def _sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self._offsets[index], self._offsets[index + 1]
        tokens = self._tokens[start:end].astype(np.int64)
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        trained = self._trained[start + 1 : end]
        labels[:-1][trained] = tokens[1:][trained]
        return tokens, labels


def _greedy_packs(lengths: np.ndarray, max_seq_len: int) -> list[int]:
    """Sample indices where each pack starts (and, last, the end): consecutive samples that fit."""
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > max_seq_len and used:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return starts


def chat_sft_dataset(
    tokenizer,
    rows: list[Row],
    to_messages: Callable[[dict], list[dict]],
    *,
    name: str,
    max_seq_len: int | None,
    train_on_input: bool,
    train_on: str,
    packed: bool,
    skip_bad_rows: bool,
    drop_untrained: bool = True,
    teacher_tokenizer=None,
) -> SFTDataset:
    """Render each row's conversation with the chat template, then tokenize all rows in one batch.

    A sample left with no trained token (its prompt fills ``max_seq_len``, or nothing is marked
    for training) teaches nothing and would only dilute a batch: it is dropped, with one warning
    counting them, or with ``drop_untrained: false`` refused, naming its row.

    With ``teacher_tokenizer`` (distilling from a teacher whose tokenizer differs) each conversation
    is also rendered in the teacher's template and encoded by its tokenizer, and the two encodings'
    replies are aligned (`kdtune.tokenization.alignment`): an `AlignedSFTDataset`.
    """
    template = tokenizer.require_chat_template()
    check_train_on(train_on)
    if teacher_tokenizer is not None and packed:
        raise KDTuneError(f"{name}: packed: true is not supported with teacher_tokenizer (each sample is aligned "
                          f"with the teacher's own encoding of it); set packed: false")
    teacher_template = None if teacher_tokenizer is None else teacher_tokenizer.require_chat_template()

    def render(data: dict):
        messages = to_messages(data)
        mine = template.render_with_spans(messages, train_on_input=train_on_input, train_on=train_on)
        if teacher_template is None:
            return mine
        return mine, teacher_template.render_with_spans(messages, train_on_input=train_on_input, train_on=train_on)

    converted = convert_rows(rows, render, skip_bad_rows)
    max_seq_len = tokenizer.max_seq_len if max_seq_len is None else integer(1)("max_seq_len", max_seq_len)
    if teacher_tokenizer is not None:
        return aligned_dataset(tokenizer, teacher_tokenizer, converted, name=name, max_seq_len=max_seq_len,
                               drop_untrained=drop_untrained)
    whole = tokenizer.tokenize_rendered([text_spans for _, text_spans in converted]) if converted else []
    samples = [tokenizer.truncate(ids, mask, max_seq_len) for ids, mask in whole]
    untrained = [i for i, (_, mask) in enumerate(samples) if not mask[1:].any()]
    dropped = set()
    if untrained and len(untrained) < len(samples):
        first = converted[untrained[0]][0].where
        why = f"its prompt fills max_seq_len={max_seq_len}" if max_seq_len else "no token of it is trained"
        if not drop_untrained:
            raise KDTuneError(f"{first}: no token of this sample is trained ({why}); {len(untrained)} of "
                              f"{len(samples)} samples have none; raise max_seq_len, or set drop_untrained: true "
                              f"to drop them")
        warn(f"{name}: dropped {len(untrained)} of {len(samples)} samples with no trained token "
             f"(the first: {first}; {why})")
        dropped = set(untrained)
        samples = [sample for i, sample in enumerate(samples) if i not in dropped]
    dataset = SFTDataset(samples, packed=packed, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, name=name)
    kept = [i for i in range(len(whole)) if i not in dropped]  # a dropped sample was counted as dropped
    report_cut(name, [len(whole[i][0]) for i in kept], max_seq_len, [converted[i][0].where for i in kept])
    return dataset


def report_cut(name: str, lengths: list[int], max_seq_len: int | None, where: list[str]) -> None:
    """One warning counting the samples longer than ``max_seq_len``: they are cut there, never dropped."""
    cut = [i for i, n in enumerate(lengths) if max_seq_len is not None and n > max_seq_len]
    if cut:
        warn(f"{name}: {len(cut)} of {len(lengths)} samples are longer than max_seq_len={max_seq_len} and are cut "
             f"there, their ends untrained (the first: {where[cut[0]]}, {lengths[cut[0]]} tokens)")


class AlignedSFTDataset(SFTDataset):
    """Samples encoded by the student's and the teacher's tokenizers, with the aligned spans of their
    trained tokens: ``__getitem__`` adds ``teacher_tokens`` and ``spans`` (``[s0, s1, t0, t1]`` each,
    token indices; see `kdtune.tokenization.alignment`)."""

    def __init__(self, samples, teacher_tokens: list[np.ndarray], spans: list[np.ndarray], **kwargs):
        super().__init__(samples, packed=False, **kwargs)
        self._teacher_offsets = np.concatenate([[0], np.cumsum([len(t) for t in teacher_tokens])])
        self._teacher_tokens = np.concatenate(teacher_tokens)
        self._span_offsets = np.concatenate([[0], np.cumsum([len(s) for s in spans])])
        self._spans = np.concatenate(spans).reshape(-1, 4)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(super().fingerprint().encode())
        for array in (self._teacher_offsets, self._teacher_tokens, self._spans):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        index %= len(self)
        teacher = self._teacher_tokens[self._teacher_offsets[index] : self._teacher_offsets[index + 1]]
        spans = self._spans[self._span_offsets[index] : self._span_offsets[index + 1]]
        return {**sample, "teacher_tokens": teacher.astype(np.int64).tolist(), "spans": spans.tolist()}


def aligned_dataset(tokenizer, teacher_tokenizer, converted, *, name: str, max_seq_len: int | None,
                    drop_untrained: bool = True) -> AlignedSFTDataset:
    """The student's samples of ``converted`` rows (each ``(row, (student render, teacher render))``)
    with the teacher's encodings and the aligned spans; both sides are cut at ``max_seq_len``, and a
    span cut by either side is dropped (the student's tokens in it are still trained by CE). A sample
    with no trained token is dropped (one warning) or, with ``drop_untrained`` false, refused."""
    from kdtune.tokenization.alignment import align_replies

    renders = [value for _, value in converted]
    if not renders:
        raise KDTuneError(f"{name}: no samples")
    samples, teacher_tokens, spans, untrained = [], [], [], []
    student_encodings = tokenizer.encodings([mine[0] for mine, _ in renders])
    teacher_encodings = teacher_tokenizer.encodings([theirs[0] for _, theirs in renders])
    for (row, _), (mine, theirs), s_enc, t_enc in zip(converted, renders, student_encodings, teacher_encodings):
        ids, mask = tokenizer.truncate(*tokenizer.masked(s_enc, mine[1]), max_seq_len)
        teacher_ids, _ = teacher_tokenizer.truncate(*teacher_tokenizer.masked(t_enc, theirs[1]), max_seq_len)
        # a cut sample's last token became the end-of-turn token: spans stop before it
        s_end, t_end = (len(x) - (len(e.ids) > len(x)) for x, e in ((ids, s_enc), (teacher_ids, t_enc)))
        aligned = [span for span in align_replies((*mine, s_enc), (*theirs, t_enc))
                   if 0 < span[0] and span[1] <= s_end and 0 < span[2] and span[3] <= t_end]
        if not mask[1:].any():
            untrained.append(row.where)
            continue
        samples.append((ids, mask))
        teacher_tokens.append(np.asarray(teacher_ids, dtype=np.int32))
        spans.append(np.asarray(aligned, dtype=np.int32).reshape(-1, 4))
    if untrained and (not drop_untrained or not samples):
        raise KDTuneError(f"{untrained[0]}: no token of this sample is trained (max_seq_len={max_seq_len}); "
                          f"{len(untrained)} of {len(converted)} samples have none; raise max_seq_len"
                          + (", or set drop_untrained: true to drop them" if samples else ""))
    if untrained:
        warn(f"{name}: dropped {len(untrained)} of {len(converted)} samples with no trained token (the first: "
             f"{untrained[0]}; its prompt fills max_seq_len={max_seq_len})")
    report_cut(name, [len(e.ids) for e in student_encodings], max_seq_len, [row.where for row, _ in converted])
    return AlignedSFTDataset(samples, teacher_tokens, spans, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id,
                             name=name)
