"""Intermediate-layer distillation: the student's hidden states matched to the teacher's.

Logit distillation tells the student what to answer; matching the residual stream after chosen
layers tells it how to get there (as Minitron does when depth is pruned). Each student layer of the
map is paired with a teacher layer; a learned linear projection (per pair, or one shared) carries
the student's states into the teacher's width, and the loss is the mean over pairs of a per-token
distance, summed over the trained tokens (label != -100) and divided by ``num_tokens`` — the
optimizer step's count across micro-batches and ranks, as for the logit losses. The projections
train with the student and are saved with the training state, never in the student's weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.models.args import ModelArgs


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Every student layer ``i`` paired with teacher layer ``(i + 1) * T // S - 1``: spread evenly,
    the last with the last."""
    return [(i, (i + 1) * teacher_layers // student_layers - 1) for i in range(student_layers)]


class HiddenStateLoss(nn.Module):
    """``forward(student_states, teacher_states, labels, *, num_tokens)``: the lists of ``[B, S, d]``
    states after the mapped layers (``student_layers`` and ``teacher_layers`` say which, for the
    models' ``return_layers``) → the loss, unweighted; the recipe adds ``weight`` times it.

    ``layers``: ``"uniform"`` or a list of ``[student_layer, teacher_layer]`` pairs. ``projection``:
    ``linear`` (initialized to the identity, padded or cut where the widths differ) or ``none``
    (the widths must agree). ``shared_projection``: one projection for every pair.
    """

    def __init__(self, *, student: ModelArgs, teacher: ModelArgs, layers="uniform", weight: float = 0.1,
                 projection: str = "linear", shared_projection: bool = False):
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise KDTuneError(f"weight: expected a number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.pairs = self._pairs(layers, student.num_layers, teacher.num_layers)
        if projection not in ("linear", "none"):
            raise KDTuneError(f"projection: expected linear or none, got {projection!r}")
        d_s, d_t = student.hidden_size, teacher.hidden_size
        self.projections = None
        if projection == "none":
            if d_s != d_t:
                raise KDTuneError(f"projection: none needs equal widths, but the student's hidden states have {d_s} "
                                  f"channels and the teacher's {d_t}; use projection: linear")
        else:
            self.projections = nn.ModuleList(nn.Linear(d_s, d_t, bias=False)
                                             for _ in range(1 if shared_projection else len(self.pairs)))
            for linear in self.projections:
                nn.init.eye_(linear.weight)

    @staticmethod
    def _pairs(layers, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        if layers == "uniform":
            return uniform_layer_map(student_layers, teacher_layers)
        if not isinstance(layers, list) or not layers or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p) for p in layers):
            raise KDTuneError(f"layers: expected 'uniform' or a list of [student_layer, teacher_layer] pairs, "
                              f"got {layers!r}")
        for s, t in layers:
            if not (0 <= s < student_layers and 0 <= t < teacher_layers):
                raise KDTuneError(f"layers: [{s}, {t}] names no layer pair of a {student_layers}-layer student and "
                                  f"a {teacher_layers}-layer teacher")
        return [tuple(p) for p in layers]

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.pairs]

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` projected student and teacher states → ``[N]`` distances."""
        raise NotImplementedError

    def forward(self, student_states, teacher_states, labels: torch.Tensor, *, num_tokens: int) -> torch.Tensor:
        keep = labels.reshape(-1) != -100
        total = 0.0
        for k, (s, t) in enumerate(zip(student_states, teacher_states)):
            rows = s.reshape(-1, s.shape[-1])[keep].float()  # the loss math in float32
            if self.projections is not None:
                linear = self.projections[0 if len(self.projections) == 1 else k]
                rows = F.linear(rows, linear.weight.float())
            target = t.detach().reshape(-1, t.shape[-1])[keep].float()
            total = total + self.per_token(rows, target).sum()
        return total / (num_tokens * len(self.pairs))


class MSEHiddenStateLoss(HiddenStateLoss):
    """Mean squared error over the channels."""

    def per_token(self, student, teacher):
        return (student - teacher).pow(2).mean(-1)


class NormalizedMSEHiddenStateLoss(HiddenStateLoss):
    """Squared error relative to the teacher state's squared norm: ``||p - t||² / ||t||²``, so layers
    whose states are larger do not dominate."""

    def per_token(self, student, teacher):
        return (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(torch.finfo(teacher.dtype).tiny)


class CosineHiddenStateLoss(HiddenStateLoss):
    """``1 - cos(p, t)``: the direction of the state, not its scale."""

    def per_token(self, student, teacher):
        return 1 - F.cosine_similarity(student, teacher, dim=-1)
