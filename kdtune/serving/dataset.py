"""Distilling online from a served teacher: each sample joined with the server's top-k rows for its
trained positions, in the form a teacher cache gives them (``teacher_logprobs``, ``teacher_ids``),
so `collate_with_teacher_topk` and every top-k loss read them alike. A teacher of another tokenizer
is asked about its own encoding of each sample (`collate_aligned_topk`).

The DataLoader asks for a whole batch at once (``__getitems__``), so its requests are in flight
together; `StepBatches` with ``lookahead`` loads the next step's batches while this one trains.
"""

from kdtune.datasets.fingerprint import fingerprint


class ServedTeacherDataset:
    def __init__(self, dataset, teacher):
        self.dataset, self.teacher = dataset, teacher

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        return fingerprint(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        samples = [self.dataset[i] for i in indices]
        if "spans" in samples[0]:  # a teacher of another tokenizer: its rows over its own tokens
            return self.aligned(samples)
        rows = self.teacher.sample_rows(samples)
        return [{**s, "teacher_logprobs": lp, "teacher_ids": ids} for s, (lp, ids, _) in zip(samples, rows)]

    def aligned(self, samples: list[dict]) -> list[dict]:
        """Samples aligned with the teacher's encoding (``teacher_tokens``, ``spans``) joined with the
        server's rows at the teacher positions the spans read: the top-k rows that predict each
        span's first teacher token and the log-probabilities of its later ones (``teacher_own``)."""
        positions = [sorted({p for _, _, t0, t1 in s["spans"] for p in range(t0 - 1, t1 - 1)}) for s in samples]
        rows = self.teacher.client.map(lambda i: self.teacher.sequence_rows(list(samples[i]["teacher_tokens"]),
                                                                           positions[i]), range(len(samples)))
        return [{**s, "teacher_logprobs": lp, "teacher_ids": ids, "teacher_own": own, "teacher_positions": where}
                for s, (lp, ids, own), where in zip(samples, rows, positions)]


def collate_aligned_topk(samples: list[dict], pad_id: int) -> dict:
    """`collate` of aligned samples joined with a served teacher's rows (`ServedTeacherDataset.aligned`),
    plus ``teacher_topk``: an `AlignedTeacher` of its top-k rows ``[B, T, k]`` and of the
    log-probability ``[B, T]`` of the teacher token after each position (0 where not fetched)."""
    import torch

    from kdtune.datasets import collate
    from kdtune.losses import AlignedTeacher
    from kdtune.offline.dataset import rows_at

    batch = collate(samples, pad_id)
    fetched = torch.zeros(batch["teacher_tokens"].shape, dtype=torch.bool)
    for i, s in enumerate(samples):
        fetched[i, s["teacher_positions"]] = True
    logprobs, ids, own = (torch.cat([s[key] for s in samples]) for key in ("teacher_logprobs", "teacher_ids", "teacher_own"))
    token_logprobs = torch.zeros(fetched.shape, dtype=own.dtype)
    token_logprobs[fetched] = own
    batch["teacher_topk"] = AlignedTeacher(rows_at(fetched, logprobs, ids), None, batch["spans"], token_logprobs)
    return batch
