"""What a recipe minimizes per micro-batch: cross-entropy alone (SFT) or mixed with a divergence
from the teacher (distillation), in the loss form the config picks.

``fused`` (default) never materializes either model's ``[tokens, vocab]`` logits: both models
return hidden states and the loss projects them chunk by chunk. ``chunked`` asks the models for
lists of logits chunks; ``full`` computes whole logits (the baseline the others are checked against).
"""

import torch
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.losses import CrossEntropyLoss, Divergence, ForwardKLLoss, FusedLinearKDLoss, TeacherTopK
from kdtune.training.loop import StepLoss

FORMS = ("fused", "chunked", "full")


def loss_options(cfg) -> dict:
    """The config's ``loss_form`` and ``loss_chunk_size`` as `DistillationObjective` arguments."""
    return {"form": cfg.get("loss_form", "fused"), "chunk_size": cfg.get("loss_chunk_size", 256)}


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("mask", "input_pos") if k in batch}


class DistillationObjective:
    """``(1 - kd_ratio) * CE + kd_ratio * divergence(teacher || student)`` over the batch's labels.

    ``teacher`` is a frozen model, or None when the batch carries the teacher's cached top-k
    log-probabilities (``batch["teacher_topk"]``, a :class:`TeacherTopK`). Without a teacher and
    a divergence this is plain cross-entropy, which is how the SFT recipes use it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, divergence: Divergence | None = None,
                 *, kd_ratio: float = 0.0, form: str = "fused", chunk_size: int = 256, num_output_chunks: int = 8):
        self.distills = divergence is not None
        if not self.distills:  # SFT: the divergence only carries ignore_index; kd_ratio 0 never uses it
            divergence, kd_ratio = ForwardKLLoss(), 0.0
        if form not in FORMS:
            raise KDTuneError(f"loss_form: expected one of {', '.join(FORMS)}, got '{form}'")
        # Every form divides by the optimizer step's token count itself, never by the batch's.
        divergence.reduction = "sum"
        self.student, self.teacher, self.divergence = student, teacher, divergence
        self.kd_ratio, self.form = kd_ratio, form
        self.fused = FusedLinearKDLoss(divergence, kd_ratio=kd_ratio, chunk_size=chunk_size)
        self.cross_entropy = CrossEntropyLoss(ignore_index=divergence.ignore_index, reduction="sum",
                                              vocab_size=divergence.vocab_size)
        chunks = num_output_chunks if form == "chunked" else 0
        for model in (student, teacher):
            if model is not None:
                model.num_output_chunks = chunks

    def _teacher_out(self, batch: dict, hidden: bool):
        if "teacher_topk" in batch:  # the loop moves tensors to the device, not this pair
            topk, device = batch["teacher_topk"], batch["tokens"].device
            return TeacherTopK(topk.logprobs.to(device), topk.ids.to(device))
        if self.teacher is None or self.kd_ratio == 0:
            return None
        with torch.inference_mode():
            out = self.teacher(batch["tokens"], return_hidden=hidden, **_model_inputs(batch))
        # Inference tensors cannot enter autograd graphs; a clone outside inference mode can.
        return [t.clone() for t in out] if isinstance(out, list) else out.clone()

    def __call__(self, batch: dict, num_tokens: int) -> StepLoss:
        labels = batch["labels"]
        if self.form == "fused":
            hidden = self.student(batch["tokens"], return_hidden=True, **_model_inputs(batch))
            teacher = self._teacher_out(batch, hidden=True)
            teacher_weight = self.teacher.output_weight if isinstance(teacher, torch.Tensor) else None
            loss, ce, kd = self.fused(hidden, self.student.output_weight, teacher, teacher_weight, labels,
                                      num_valid_tokens=num_tokens)
            return self._result(loss, ce, kd)
        logits = self.student(batch["tokens"], **_model_inputs(batch))
        teacher = self._teacher_out(batch, hidden=False)
        ce = self.cross_entropy(logits, labels) / num_tokens
        kd = self.divergence(logits, teacher, labels) / num_tokens if teacher is not None else torch.zeros_like(ce)
        return self._result((1 - self.kd_ratio) * ce + self.kd_ratio * kd, ce, kd)

    def _result(self, loss, ce, kd) -> StepLoss:
        parts = {"ce_loss": ce.item(), "kd_loss": kd.item()} if self.distills else {}
        return StepLoss(loss, parts)

