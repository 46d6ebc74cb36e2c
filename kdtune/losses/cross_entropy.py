"""Cross-entropy against the labels, in the same full and chunked forms as the divergences."""

import torch
import torch.nn.functional as F

from kdtune.losses.token_loss import TokenLoss


class CrossEntropyLoss(TokenLoss):
    """−log q(label) averaged over valid tokens (no temperature: the hard-label term).

    ``forward(student_logits, labels)`` with ``[B, S, V]`` logits or a list of sequence chunks.
    """

    def forward(self, student_logits, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(student_logits, None, labels)

    def token_values(self, student_logits: torch.Tensor, teacher, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits, targets, reduction="none")
