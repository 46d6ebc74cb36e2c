"""A teacher given as its top-k log-probabilities per token (offline cached logits).

The k + 1 outcome view: each of the k ids is one outcome and everything else is one tail bucket.
The teacher's tail mass is ``1 - sum(exp(logprobs))`` (clamped at 0); the student's is the exact sum
of its probabilities outside the ids. Any divergence is then evaluated between these two (k + 1)-way
distributions: by the data-processing inequality this is a lower bound of the dense divergence,
equal to it when the ids cover the vocabulary. Where the student has no mass outside the ids
(k = V, or the rest masked with -inf) the bucket is empty for both, so k = V gives exactly the
dense value rather than a rounding-sized teacher tail against a zero student tail.
"""

from dataclasses import dataclass

import torch

from kdtune.losses.numerics import probabilities


@dataclass(frozen=True)
class TeacherTopK:
    """Teacher top-k log-probabilities ``[..., k]`` and their token ids ``[..., k]`` (distinct per row).

    Log-probabilities are used as given: temperature is not applied to them, so cache them at the
    temperature you train with.
    """

    logprobs: torch.Tensor
    ids: torch.Tensor

    def flat(self) -> "TeacherTopK":
        k = self.ids.shape[-1]
        return TeacherTopK(self.logprobs.reshape(-1, k), self.ids.reshape(-1, k))

    def rows(self, index) -> "TeacherTopK":
        """Rows of a flat ``[N, k]`` teacher, by slice or index tensor."""
        return TeacherTopK(self.logprobs[index], self.ids[index])

    def split(self, sizes: list[int]) -> list["TeacherTopK"]:
        """Chunks along the sequence dimension of a ``[B, S, k]`` teacher."""
        pairs = zip(self.logprobs.split(sizes, dim=1), self.ids.split(sizes, dim=1))
        return [TeacherTopK(lp, ids) for lp, ids in pairs]

    def bucket(self, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher log-probabilities ``[N, k + 1]`` over the ids plus the tail bucket."""
        log_p = self.logprobs.detach().to(log_q.dtype)
        log_q_top = log_q.gather(-1, self.ids)
        q_tail = probabilities(log_q).scatter(-1, self.ids, 0.0).sum(-1, keepdim=True)
        p_tail = torch.expm1(log_p.logsumexp(-1, keepdim=True)).neg().clamp_min(0.0)
        empty = q_tail == 0
        # The clamp keeps log's gradient finite where the bucket is empty (then masked to -inf).
        log_q_tail = q_tail.clamp_min(torch.finfo(q_tail.dtype).tiny).log().masked_fill(empty, float("-inf"))
        log_p_tail = p_tail.log().masked_fill(empty, float("-inf"))
        return torch.cat([log_q_top, log_q_tail], -1), torch.cat([log_p, log_p_tail], -1)
