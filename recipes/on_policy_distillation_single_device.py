"""On-policy distillation (generalized knowledge distillation, GKD) on one device.

Each optimizer step, with probability ``lmbda`` the student (full, LoRA or QLoRA) writes the
completions of the step's prompts itself and the frozen teacher grades them token by token;
otherwise the teacher writes them (``seq_kd: true``) or the dataset's own replies are used. The loss
is the ``kd_loss`` divergence (default: generalized JSD, beta 0.5) on completion tokens only, fused
with the output projections; ``kd_ratio < 1`` mixes cross-entropy in on the dataset's replies.
``generation.temperature`` is the sampling temperature, ``kd_loss.temperature`` the loss's.
Copy this file (`kdtune cp`) to change how it works.
"""

from omegaconf import OmegaConf

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.datasets import collate_prompts
from kdtune.errors import KDTuneError
from kdtune.training.on_policy import GKDObjective, OnPolicyBatches, check_settings


@kdtune.config.parse
def main(cfg):
    # 1. Everything that can be checked before a weight is loaded.
    run = training.RunContext(cfg)
    kd = training.distillation_parts(cfg)
    if kd.teacher_cache:
        raise KDTuneError("teacher_logits_cache: on-policy distillation grades the student's own samples, "
                          "so it needs the teacher itself (teacher_checkpointer)")
    tokenizer, checkpointer, divergence = kd.tokenizer, kd.checkpointer, kd.divergence
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)  # prompts, with their reference replies if any
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    check_settings(lmbda=cfg.lmbda, seq_kd=cfg.seq_kd, generation=generation, dataset=dataset)
    prompts = training.build_batches(cfg, run, dataset, lambda b: collate_prompts(b, tokenizer.pad_id))

    # 2. The models: a trainable student and a frozen teacher.
    student = training.load_student(checkpointer, cfg.model, device=run.device, dtype=run.dtype,
                                    resume_dir=run.resume_dir)
    teacher = training.load_teacher(kd.teacher_checkpointer, cfg.get("teacher"), device=run.device, dtype=run.dtype)

    # 3. Each step's completions (student, teacher or dataset), the loss on them; then train.
    batches = OnPolicyBatches(student, teacher, lmbda=cfg.lmbda, seq_kd=cfg.seq_kd, seed=run.seed,
                              generation=generation, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                              vocab_size=divergence.vocab_size, device=run.device)
    objective = GKDObjective(student, teacher, divergence, kd_ratio=cfg.kd_ratio,
                             **training.loss_options(cfg))
    loop = training.build_loop(cfg, run, student, objective, prompts, training.student_saver(checkpointer, student),
                               prepare_step=batches)
    loop.train()


if __name__ == "__main__":
    main()
