"""Knowledge distillation on several devices or nodes, with FSDP2 under torchrun.

The same distillation as ``knowledge_distillation_single_device`` — a frozen teacher guiding a full,
LoRA or QLoRA student through ``(1 - kd_ratio) * CE + kd_ratio * KD`` — with both models sharded
over the processes (each decoder layer and the root a ``fully_shard`` unit) and each process taking
its share of every global batch. Launch with ``kdtune run --nproc_per_node N
knowledge_distillation_distributed --config ...`` (add torchrun's ``--nnodes``/``--rdzv_*`` options
for several nodes). With ``teacher_logits_cache`` in place of ``teacher_checkpointer`` the teacher is
never loaded. Its loop is the single-device recipe's, line for line (a test keeps it so).

The training step is this file: copy it (``kdtune cp knowledge_distillation_distributed my_kd.py``)
and edit it — a kd_ratio schedule, a metric of your own, other optimizer parameter groups, another
loss term. kdtune supplies the parts: loading, data, resumable state, losses, savers and loggers.
"""

import time

import torch
from torch import nn

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.config.settings import DistillationSettings
from kdtune.errors import KDTuneError
from kdtune.losses import AlignedTeacher, ForwardKLLoss, LinearKDLoss
from kdtune.training import distributed


@kdtune.config.parse(DistillationSettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    # 1. Settings, output folder and data: everything that can be checked before a weight loads.
    run = training.RunContext(cfg, s, distributed.FSDPDistribution())  # joins the process group
    kd = training.distillation_parts(cfg)
    # with a teacher cache or server, each sample joined with the teacher's top-k rows
    dataset, collate = training.join_teacher(instantiate(cfg.dataset, tokenizer=kd.tokenizer, **kd.dataset_args), kd)
    training.check_positions(dataset, *kd.checkpointers)  # no sample longer than the models' positions
    training.check_memory_plan(run.device, run.dtype, kd.checkpointer, cfg.get("model"), cfg.optimizer,
                               kd.teacher_checkpointer, cfg.get("teacher"), processes=run.dist.world_size)
    steps = training.StepBatches(dataset, batch_size=s.batch_size, collate_fn=lambda b: collate(b, kd.tokenizer.pad_id),
                                 seed=run.seed, shuffle=s.shuffle, max_steps_per_epoch=s.max_steps_per_epoch,
                                 gradient_accumulation_steps=s.gradient_accumulation_steps, dist=run.dist,
                                 lookahead=kd.teacher_server is not None)  # the server's next rows come meanwhile
    if s.validation and kd.teacher_cache:
        raise KDTuneError("validation: the teacher cache holds the training samples only; validating needs the "
                          "teacher itself (teacher_checkpointer)")
    val_batches = training.build_validation(cfg, s, kd.tokenizer, lambda b: collate(b, kd.tokenizer.pad_id), run.dist,
                                           join=lambda d: training.join_teacher(d, kd)[0], dataset_args=kd.dataset_args)

    # 2. The models, each loaded (memory-mapped) on every process and then sharded over them.
    student = distributed.shard(training.load_student(kd.checkpointer, cfg.get("model"), device=run.device,
                                                      dtype=run.dtype, resume_dir=run.resume_dir), run.dist, key="model")
    if run.dist.is_main:
        print(training.describe_trainable(student))  # what trains, in one line
    teacher = None if kd.teacher_checkpointer is None else distributed.shard(
        training.load_teacher(kd.teacher_checkpointer, cfg.get("teacher"), device=run.device, dtype=run.dtype),
        run.dist, key="teacher")
    if s.compile:  # each decoder layer on its own: the first steps run slower while they compile
        for layer in student.layers:
            layer.compile()

    # 3. Optimizer, schedule, losses, saver, the state a resume restores; then the run starts (lock, records, logger).
    hidden_loss = distributed.shard_module(kd.hidden_state_loss, run.dist)  # its projections train too (or None)
    trained = nn.ModuleList([student, *([hidden_loss] if hidden_loss else [])])
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer, params)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=s.epochs * steps.steps_per_epoch)
    # each model's final-logit cap (Gemma 2), applied to its logits in every loss form; a cache holds capped rows
    caps = dict(student_softcap=student.args.final_logit_softcapping,
                teacher_softcap=teacher.args.final_logit_softcapping if teacher else None,
                compile=s.compile_loss)
    if kd.teacher_tokenizer:  # the teacher's tokenizer differs: the loss compares aligned spans (uld, hybrid_uld),
        kd_loss = kl_to_teacher = kd.divergence  # and val_kl is that loss too (no per-token KL exists across vocabularies)
    else:
        kd_loss = LinearKDLoss(kd.divergence, form=s.loss_form, chunk_size=s.loss_chunk_size, **caps)
        kl_to_teacher = LinearKDLoss(ForwardKLLoss(vocab_size=kd.divergence.vocab_size), form=s.loss_form,
                                     chunk_size=s.loss_chunk_size, **caps)  # validation's val_kl, whatever kd_loss is
    save = distributed.sharded_saver(kd.checkpointer, student, run.dist)  # full weights from rank 0, optimizer shards
    state = training.TrainingState(run.dist)
    state.register("optimizer", run.dist.optimizer_state(trained, optimizer))
    state.register("lr_scheduler", lr_scheduler)
    if hidden_loss:
        state.register("hidden_state_loss", run.dist.module_state(hidden_loss))  # the learned projections
    if run.resume_dir is not None:
        state.load(run.resume_dir)
    run.start(dataset=dataset, tokenizer=kd.tokenizer, step=state.global_step)  # checks passed: lock, record
    logger = training.build_metric_logger(cfg.get("metric_logger"), run.output_dir, run.dist)

    def forward(batch):
        """The student's final hidden states and those after its mapped layers, and the teacher's (or
        its cached top-k) with its output weight."""
        inputs = {"mask": batch.get("mask"), "input_pos": batch.get("input_pos"), "return_hidden": True}
        hidden, states = student(batch["tokens"], **inputs, return_layers=hidden_loss.student_layers if hidden_loss
                                 else [])
        if teacher is None:
            return hidden, states, batch["teacher_topk"], [], None
        if "spans" in batch:  # a teacher of another tokenizer reads its own encoding of each sample
            with torch.no_grad():
                teacher_hidden = teacher(batch["teacher_tokens"], return_hidden=True)
            return hidden, states, AlignedTeacher(teacher_hidden, batch["teacher_tokens"], batch["spans"]), [], \
                teacher.output_weight
        with torch.no_grad():
            teacher_hidden, teacher_states = teacher(batch["tokens"], **inputs, return_layers=hidden_loss.teacher_layers
                                                     if hidden_loss else [])
        return hidden, states, teacher_hidden, teacher_states, teacher.output_weight

    def validate(kd_ratio: float, temperature: float) -> dict:
        """Held-out losses of the student as it is now, over every process's share of the data."""
        student.eval()
        num_tokens = training.step_tokens(val_batches, run.dist)
        metrics = training.StepMetrics()
        with torch.no_grad(), run.autocast():
            for batch in val_batches:
                batch = training.to_device(batch, run.device)
                hidden, states, teacher_out, teacher_states, teacher_weight = forward(batch)
                heads = (hidden, student.output_weight, teacher_out, teacher_weight, batch["labels"])
                ce, kd_term = kd_loss(*heads, kd_ratio=kd_ratio, num_tokens=num_tokens, temperature=temperature)
                kl = kl_to_teacher(*heads, kd_ratio=1.0, num_tokens=num_tokens)[1]
                loss = (1 - kd_ratio) * ce + kd_ratio * kd_term
                if hidden_loss:
                    matched = hidden_loss(states, teacher_states, batch["labels"], num_tokens=num_tokens)
                    loss = loss + hidden_loss.weight * matched
                    metrics.add(val_hidden_state_loss=matched)
                metrics.add(val_loss=loss, val_ce_loss=ce, val_kd_loss=kd_term, val_kl=kl)
        student.train()
        return metrics.reduce(run.dist)

    # 4. Train: each optimizer step accumulates the gradients of its micro-batches, then steps.
    bar = training.progress_bar(s.epochs * steps.steps_per_epoch, state.global_step, run.dist)
    last_checkpoint = run.resume_dir
    student.train()
    while state.epoch < s.epochs:
        for micro in steps.epoch(state):  # state.global_step now numbers this step
            start = time.perf_counter()
            kd_ratio = s.kd_ratio
            temperature = kd.divergence.temperature  # the loss's, this step (a schedule may vary it)
            num_tokens = training.step_tokens(micro, run.dist)  # of all micro-batches on all processes
            metrics = training.StepMetrics()
            for batch in micro:
                batch = training.to_device(batch, run.device)
                with run.autocast():  # bf16 matmuls when autocast is set; the loss math stays float32
                    hidden, states, teacher_out, teacher_states, teacher_weight = forward(batch)
                    ce, kd_term = kd_loss(hidden, student.output_weight, teacher_out, teacher_weight,
                                          batch["labels"], kd_ratio=kd_ratio, num_tokens=num_tokens,
                                          temperature=temperature)
                loss = (1 - kd_ratio) * ce + kd_ratio * kd_term
                if hidden_loss:  # + weight * the intermediate-layer loss
                    matched = hidden_loss(states, teacher_states, batch["labels"], num_tokens=num_tokens)
                    loss = loss + hidden_loss.weight * matched
                    metrics.add(hidden_state_loss=matched)
                run.dist.backward(loss)
                metrics.add(loss=loss, ce_loss=ce, kd_loss=kd_term)
            values = metrics.reduce(run.dist)
            training.check_finite(values["loss"], state.global_step, last_checkpoint)
            if s.clip_grad_norm is not None:
                values["grad_norm"] = run.dist.clip_grad_norm(params, s.clip_grad_norm)
            values["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            values.update(kd_ratio=kd_ratio, num_tokens=num_tokens, peak_memory_gb=training.peak_memory_gb(run.device),
                          tokens_per_second=num_tokens / run.dist.world_size / (time.perf_counter() - start))
            if val_batches and state.global_step % s.validation.every_n_steps == 0:
                values.update(validate(kd_ratio, temperature))
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
