"""Distilling online from a served teacher: each sample joined with the server's top-k rows for its
trained positions, in the form a teacher cache gives them (``teacher_logprobs``, ``teacher_ids``),
so `collate_with_teacher_topk` and every top-k loss read them alike.

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
        rows = self.teacher.sample_rows(samples)
        return [{**s, "teacher_logprobs": lp, "teacher_ids": ids} for s, (lp, ids, _) in zip(samples, rows)]
