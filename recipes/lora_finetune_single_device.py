"""LoRA or QLoRA fine-tuning on one device — also how a teacher is adapted to the target data
before distillation.

Only the adapters train; the base weights stay frozen (in NF4 with ``model.quantize_base: true``).
The loss is cross-entropy on the dataset's trained tokens, by default fused with the output
projection. Each checkpoint holds the merged weights in HF format plus the PEFT adapter in
``adapter/``.

The training step is this file: copy it (``kdtune cp lora_finetune_single_device my_lora.py``) and
edit it — a metric of your own, other optimizer parameter groups, another loss term. kdtune supplies
the parts: loading, data, resumable state, losses, savers and loggers.
"""

import time

import torch

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.config.settings import TrainingSettings
from kdtune.datasets import collate
from kdtune.errors import KDTuneError
from kdtune.losses import LinearCrossEntropyLoss


@kdtune.config.parse(TrainingSettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    # 1. Settings, output folder and data: everything that can be checked before a weight loads.
    if not training.is_lora(cfg.get("model")):
        raise KDTuneError("model.lora_rank: required, this recipe trains LoRA adapters; "
                          "use full_finetune_single_device to train every weight")
    run = training.RunContext(cfg, s)
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    training.check_positions(dataset, checkpointer)  # no sample longer than the model's positions
    training.check_memory_plan(run.device, run.dtype, checkpointer, cfg.get("model"), cfg.optimizer)  # it fits
    steps = training.StepBatches(dataset, batch_size=s.batch_size, collate_fn=lambda b: collate(b, tokenizer.pad_id),
                                 seed=run.seed, shuffle=s.shuffle, max_steps_per_epoch=s.max_steps_per_epoch,
                                 gradient_accumulation_steps=s.gradient_accumulation_steps, dist=run.dist)
    val_batches = training.build_validation(cfg, s, tokenizer, lambda b: collate(b, tokenizer.pad_id), run.dist)

    # 2. Base weights from the checkpoint, adapters on top (from the resume checkpoint when resuming).
    model = training.load_student(checkpointer, cfg.get("model"), device=run.device, dtype=run.dtype,
                                  resume_dir=run.resume_dir)
    print(training.describe_trainable(model))  # what trains, in one line
    if s.compile:  # each decoder layer on its own: the first steps run slower while they compile
        for layer in model.layers:
            layer.compile()

    # 3. Optimizer, schedule, loss, saver, the state a resume restores; then the run starts (lock, records, logger).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer, params)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=s.epochs * steps.steps_per_epoch)
    ce_loss = LinearCrossEntropyLoss(form=s.loss_form, chunk_size=s.loss_chunk_size,
                                     softcap=model.args.final_logit_softcapping,  # Gemma 2 caps its logits
                                     compile=s.compile_loss)
    save = training.student_saver(checkpointer, model)
    state = training.TrainingState(run.dist)
    state.register("optimizer", run.dist.optimizer_state(model, optimizer))
    state.register("lr_scheduler", lr_scheduler)
    if run.resume_dir is not None:
        state.load(run.resume_dir)
    run.start(dataset=dataset, tokenizer=tokenizer, step=state.global_step)  # checks passed: lock, record
    logger = training.build_metric_logger(cfg.get("metric_logger"), run.output_dir, run.dist)

    def forward(batch):
        """The model's final hidden states (the loss projects them through the output weight)."""
        return model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"), return_hidden=True)

    def validate() -> dict:
        """Held-out loss of the model as it is now, over every process's share of the data."""
        model.eval()
        num_tokens = training.step_tokens(val_batches, run.dist)
        metrics = training.StepMetrics()
        with torch.no_grad(), run.autocast():
            for batch in val_batches:
                batch = training.to_device(batch, run.device)
                metrics.add(val_loss=ce_loss(forward(batch), model.output_weight, batch["labels"], num_tokens=num_tokens))
        model.train()
        return metrics.reduce(run.dist)

    # 4. Train: each optimizer step accumulates the gradients of its micro-batches, then steps.
    bar = training.progress_bar(s.epochs * steps.steps_per_epoch, state.global_step, run.dist)
    last_checkpoint = run.resume_dir
    model.train()
    while state.epoch < s.epochs:
        for micro in steps.epoch(state):  # state.global_step now numbers this step
            start = time.perf_counter()
            num_tokens = training.step_tokens(micro, run.dist)  # of all micro-batches on all processes
            metrics = training.StepMetrics()
            for batch in micro:
                batch = training.to_device(batch, run.device)
                with run.autocast():  # bf16 matmuls when autocast is set; the loss math stays float32
                    loss = ce_loss(forward(batch), model.output_weight, batch["labels"], num_tokens=num_tokens)
                run.dist.backward(loss)
                metrics.add(loss=loss)
            values = metrics.reduce(run.dist)
            training.check_finite(values["loss"], state.global_step, last_checkpoint)
            if s.clip_grad_norm is not None:
                values["grad_norm"] = run.dist.clip_grad_norm(params, s.clip_grad_norm)
            values["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            values.update(num_tokens=num_tokens, peak_memory_gb=training.peak_memory_gb(run.device),
                          tokens_per_second=num_tokens / run.dist.world_size / (time.perf_counter() - start))
            if val_batches and state.global_step % s.validation.every_n_steps == 0:
                values.update(validate())
            if logger and state.global_step % s.log_every_n_steps == 0:
                logger.log_dict({"epoch": state.epoch, **values}, step=state.global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_second']:.0f}")
            stop = run.stop_requested()  # SIGINT or SIGTERM: stop after this step, the same on every process
            periodic = s.save_every_n_steps and state.global_step % s.save_every_n_steps == 0 \
                and state.step_in_epoch < steps.steps_per_epoch  # the epoch's end saves anyway
            if periodic or (stop and s.save_on_interrupt):
                last_checkpoint = save(step=state.global_step, recipe_state=state.state_dict())
            if stop:
                run.stop(state.global_step)  # one line saying where it stopped; exit status 130 or 143
        last_checkpoint = save(epoch=state.epoch, recipe_state=state.state_dict())
    bar.close()
    if logger:
        logger.close()


if __name__ == "__main__":
    main()
