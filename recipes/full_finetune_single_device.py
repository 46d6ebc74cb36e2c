"""Supervised fine-tuning of every weight on one device (also how kdtune pretrains tiny models).

Cross-entropy on the dataset's trained tokens, fused with the output projection so the
``[tokens, vocab]`` logits never exist. Copy this file (`kdtune cp`) to change how it works.
"""

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.datasets import collate


@kdtune.config.parse
def main(cfg):
    run = training.RunContext(cfg)
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    batches = training.build_batches(cfg, run, dataset, lambda b: collate(b, tokenizer.pad_id))

    model = training.load_student(checkpointer, cfg.get("model"), device=run.device, dtype=run.dtype,
                                  resume_dir=run.resume_dir)

    objective = training.DistillationObjective(model, **training.loss_options(cfg))
    loop = training.build_loop(cfg, run, model, objective, batches, training.student_saver(checkpointer, model))
    loop.train()


if __name__ == "__main__":
    main()
