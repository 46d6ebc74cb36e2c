"""How close a student is to its teacher on held-out chats: the smooth score the demos and the
seeded KD-versus-SFT test compare students by (exact match moves in steps; this does not)."""

import torch

import kdtune
from kdtune.datasets import chat_dataset


@torch.no_grad()
def held_out_scores(model, teacher, tokenizer, data_files: str, *, max_seq_len: int = 512) -> dict:
    """Per-token ``KL(teacher ‖ model)`` and the model's cross-entropy on the trained tokens (the
    assistant replies) of the chats in ``data_files`` (JSONL), in float64.

    ``model`` and ``teacher`` are kdtune models or checkpoint folders. Both are scored on the ids
    below the smaller of their two output widths, as the distillation losses are.
    """
    model = kdtune.load_model(model) if not isinstance(model, torch.nn.Module) else model
    teacher = kdtune.load_model(teacher) if not isinstance(teacher, torch.nn.Module) else teacher
    kl = ce = count = 0.0
    for sample in chat_dataset(tokenizer, source="json", data_files=str(data_files), max_seq_len=max_seq_len):
        ids, labels = torch.tensor([sample["tokens"]]), torch.tensor(sample["labels"])
        keep = labels != -100
        log_q, log_p = model(ids)[0, keep].double(), teacher(ids)[0, keep].double()
        width = min(log_q.shape[-1], log_p.shape[-1])
        log_q, log_p = log_q[:, :width].log_softmax(-1), log_p[:, :width].log_softmax(-1)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        ce -= log_q.gather(-1, labels[keep, None]).sum().item()
        count += int(keep.sum())
    return {"kl_to_teacher": kl / count, "ce_on_replies": ce / count}
