"""Knowledge distillation on one device.

A frozen teacher guides a student (full, LoRA or QLoRA). The loss is
``(1 - kd_ratio) * CE + kd_ratio * KD`` with ``kd_loss`` any kdtune divergence (forward/reverse KL,
generalized JSD, skew KL, TVD), by default fused with the output projections so neither model's
``[tokens, vocab]`` logits ever exist. Copy this file (`kdtune cp`) to change how it works.
"""

import kdtune.config
from kdtune import training
from kdtune.checkpointing import HFCheckpointer, check_vocab_compatible
from kdtune.config import instantiate
from kdtune.datasets import collate
from kdtune.errors import KDTuneError


@kdtune.config.parse
def main(cfg):
    # 1. Everything that can be checked before a weight is loaded.
    run = training.RunContext(cfg)
    if not 0 <= cfg.kd_ratio <= 1:
        raise KDTuneError(f"kd_ratio: expected a value in [0, 1], got {cfg.kd_ratio}")
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    teacher_checkpointer = instantiate(cfg.teacher_checkpointer)
    vocab_size = check_vocab_compatible(checkpointer.checkpoint_dir, teacher_checkpointer.checkpoint_dir,
                                        tokenizer.vocab_size)
    divergence = instantiate(cfg.kd_loss, vocab_size=vocab_size)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    batches = training.build_batches(cfg, run, dataset, lambda b: collate(b, tokenizer.pad_id))

    # 2. The models: a trainable student and a frozen teacher.
    student = training.load_student(checkpointer, cfg.model, device=run.device, dtype=run.dtype,
                                    resume_dir=run.resume_dir)
    teacher = training.load_teacher(teacher_checkpointer, cfg.get("teacher"), device=run.device, dtype=run.dtype)

    # 3. Loss, optimizer, schedule; then train, saving HF-format checkpoints as it goes.
    objective = training.DistillationObjective(student, teacher, divergence, kd_ratio=cfg.kd_ratio,
                                               form=cfg.get("loss_form", "fused"),
                                               chunk_size=cfg.get("loss_chunk_size", 1024))
    loop = training.build_loop(cfg, run, student, objective, batches, training.student_saver(checkpointer, student))
    loop.train()


if __name__ == "__main__":
    main()
