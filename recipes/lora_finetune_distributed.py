"""LoRA or QLoRA fine-tuning on several devices or nodes, with FSDP2 under torchrun — how a teacher
too large for one device is adapted to the target data before distillation.

Only the adapters train; the frozen base weights (NF4 with ``model.quantize_base: true``) are sharded
over the processes with the adapters. Each checkpoint holds the merged weights in HF format, the PEFT
adapter in ``adapter/`` and every rank's optimizer shard. Launch with
``kdtune run --nproc_per_node N lora_finetune_distributed --config ...``.
Copy this file (`kdtune cp`) to change how it works.
"""

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.datasets import collate
from kdtune.errors import KDTuneError
from kdtune.training import distributed


@kdtune.config.parse
def main(cfg):
    if not training.is_lora(cfg.get("model")):
        raise KDTuneError("model: this recipe needs LoRA settings (lora_attn_modules, lora_rank, ...)")
    run = training.RunContext(cfg, distributed.FSDPDistribution())
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    batches = training.build_batches(cfg, run, dataset, lambda b: collate(b, tokenizer.pad_id))

    # Base weights from the checkpoint, adapters on top (from the resume checkpoint when resuming),
    # loaded (memory-mapped) on every rank and then sharded over the ranks.
    model = distributed.shard(training.load_student(checkpointer, cfg.model, device=run.device, dtype=run.dtype,
                                                    resume_dir=run.resume_dir), run.dist, key="model")
    if run.dist.is_main:
        print(training.describe_trainable(model))

    objective = training.DistillationObjective(model, **training.loss_options(cfg))
    training.build_loop(cfg, run, model, objective, batches,
                        distributed.sharded_saver(checkpointer, model, run.dist)).train()


if __name__ == "__main__":
    main()
