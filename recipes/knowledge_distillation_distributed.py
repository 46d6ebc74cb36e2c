"""Knowledge distillation on several devices or nodes, with FSDP2 under torchrun.

The same distillation as ``knowledge_distillation_single_device`` — a frozen teacher guiding a full,
LoRA or QLoRA student through a fused ``(1 - kd_ratio) * CE + kd_ratio * KD`` loss — with both models
sharded over the processes (each decoder layer and the root a ``fully_shard`` unit) and each rank
taking its share of every global batch. Launch with
``kdtune run --nproc_per_node N knowledge_distillation_distributed --config ...`` (add torchrun's
``--nnodes``/``--rdzv_*`` options for several nodes). With ``teacher_logits_cache`` (made by the
cache_teacher_logits recipe) in place of ``teacher_checkpointer`` the teacher is never loaded: the KD
term uses its cached top-k log-probabilities. Copy this file (`kdtune cp`) to change how it works.
"""

import kdtune.config
from kdtune import offline, training
from kdtune.config import instantiate
from kdtune.training import distributed


@kdtune.config.parse
def main(cfg):
    # 1. Join the process group; then everything that can be checked before a weight is loaded.
    run = training.RunContext(cfg, distributed.FSDPDistribution())
    kd = training.distillation_parts(cfg)
    dataset, collate = offline.join_teacher_cache(instantiate(cfg.dataset, tokenizer=kd.tokenizer), kd.teacher_cache,
                                                  tokenizer=kd.tokenizer, temperature=kd.divergence.temperature)
    batches = training.build_batches(cfg, run, dataset, lambda b: collate(b, kd.tokenizer.pad_id))

    # 2. The models, each loaded (memory-mapped) on every rank and then sharded over the ranks.
    student = distributed.shard(training.load_student(kd.checkpointer, cfg.model, device=run.device,
                                                      dtype=run.dtype, resume_dir=run.resume_dir),
                                run.dist, key="model")
    teacher = None if kd.teacher_cache else distributed.shard(
        training.load_teacher(kd.teacher_checkpointer, cfg.get("teacher"), device=run.device, dtype=run.dtype),
        run.dist, key="teacher")

    # 3. Loss, optimizer, schedule; then train, rank 0 saving HF-format checkpoints as it goes.
    objective = training.DistillationObjective(student, teacher, kd.divergence, kd_ratio=cfg.kd_ratio,
                                               **training.loss_options(cfg))
    saver = distributed.sharded_saver(kd.checkpointer, student, run.dist)
    training.build_loop(cfg, run, student, objective, batches, saver).train()


if __name__ == "__main__":
    main()
