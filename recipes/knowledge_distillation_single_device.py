"""Knowledge distillation on one device.

A frozen teacher guides a student (full, LoRA or QLoRA). The loss is
``(1 - kd_ratio) * CE + kd_ratio * KD`` with ``kd_loss`` any kdtune divergence (forward/reverse KL,
generalized JSD, skew KL, TVD), by default fused with the output projections so neither model's
``[tokens, vocab]`` logits ever exist. With ``teacher_logits_cache`` (made by the
cache_teacher_logits recipe) in place of ``teacher_checkpointer`` the teacher is never loaded: the KD
term uses its cached top-k log-probabilities. Copy this file (`kdtune cp`) to change how it works.
"""

import kdtune.config
from kdtune import offline, training
from kdtune.config import instantiate


@kdtune.config.parse
def main(cfg):
    # 1. Everything that can be checked before a weight is loaded.
    run = training.RunContext(cfg)
    kd = training.distillation_parts(cfg)
    dataset, collate = offline.join_teacher_cache(instantiate(cfg.dataset, tokenizer=kd.tokenizer), kd.teacher_cache,
                                                  tokenizer=kd.tokenizer, temperature=kd.divergence.temperature)
    batches = training.build_batches(cfg, run, dataset, lambda b: collate(b, kd.tokenizer.pad_id))

    # 2. The models: a trainable student and a frozen teacher (none when distilling from a cache).
    student = training.load_student(kd.checkpointer, cfg.model, device=run.device, dtype=run.dtype,
                                    resume_dir=run.resume_dir)
    teacher = None if kd.teacher_cache else training.load_teacher(kd.teacher_checkpointer, cfg.get("teacher"),
                                                                  device=run.device, dtype=run.dtype)

    # 3. Loss, optimizer, schedule; then train, saving HF-format checkpoints as it goes.
    objective = training.DistillationObjective(student, teacher, kd.divergence, kd_ratio=cfg.kd_ratio,
                                               **training.loss_options(cfg))
    loop = training.build_loop(cfg, run, student, objective, batches, training.student_saver(kd.checkpointer, student))
    loop.train()


if __name__ == "__main__":
    main()
