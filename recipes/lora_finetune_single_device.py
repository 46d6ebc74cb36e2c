"""LoRA or QLoRA fine-tuning on one device — also how a teacher is adapted to the target data
before distillation.

Only the adapters train; the base weights stay frozen (in NF4 with ``model.quantize_base: true``).
Each checkpoint holds the merged weights in HF format plus the PEFT adapter in ``adapter/``.
Copy this file (`kdtune cp`) to change how it works.
"""

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.datasets import collate
from kdtune.errors import KDTuneError


@kdtune.config.parse
def main(cfg):
    run = training.RunContext(cfg)
    if not training.is_lora(cfg.get("model")):
        raise KDTuneError("model: this recipe needs LoRA settings (lora_attn_modules, lora_rank, ...); "
                          "use full_finetune_single_device to train every weight")
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    batches = training.build_batches(cfg, run, dataset, lambda b: collate(b, tokenizer.pad_id))

    # Base weights from the checkpoint, adapters on top (from the resume checkpoint when resuming).
    model = training.load_student(checkpointer, cfg.model, device=run.device, dtype=run.dtype,
                                  resume_dir=run.resume_dir)
    print(training.describe_trainable(model))

    objective = training.DistillationObjective(model, **training.loss_options(cfg))
    training.build_loop(cfg, run, model, objective, batches, training.student_saver(checkpointer, model)).train()


if __name__ == "__main__":
    main()
