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
from kdtune.checkpointing import check_vocab_compatible
from kdtune.config import instantiate
from kdtune.datasets import collate_prompts
from kdtune.errors import KDTuneError
from kdtune.training.on_policy import GKDObjective, OnPolicyBatches, check_settings


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
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)  # prompts, with their reference replies if any
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    check_settings(lmbda=cfg.lmbda, seq_kd=cfg.seq_kd, generation=generation, dataset=dataset)
    prompts = training.build_batches(cfg, run, dataset, lambda b: collate_prompts(b, tokenizer.pad_id))

    # 2. The models: a trainable student and a frozen teacher.
    student = training.load_student(checkpointer, cfg.model, device=run.device, dtype=run.dtype,
                                    resume_dir=run.resume_dir)
    teacher = training.load_teacher(teacher_checkpointer, cfg.get("teacher"), device=run.device, dtype=run.dtype)

    # 3. Each step's completions (student, teacher or dataset), the loss on them; then train.
    batches = OnPolicyBatches(student, teacher, lmbda=cfg.lmbda, seq_kd=cfg.seq_kd, seed=run.seed,
                              generation=generation, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                              vocab_size=vocab_size, device=run.device)
    objective = GKDObjective(student, teacher, divergence, kd_ratio=cfg.kd_ratio,
                             form=cfg.get("loss_form", "fused"), chunk_size=cfg.get("loss_chunk_size", 1024))
    loop = training.build_loop(cfg, run, student, objective, prompts, training.student_saver(checkpointer, student),
                               prepare_step=batches)
    loop.train()


if __name__ == "__main__":
    main()
