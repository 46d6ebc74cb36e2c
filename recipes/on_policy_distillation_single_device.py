"""On-policy distillation (generalized knowledge distillation, GKD) on one device.

Each optimizer step, with probability ``lmbda`` the student (full, LoRA or QLoRA) writes the
completions of the step's prompts itself and the frozen teacher grades them token by token;
otherwise the teacher writes them (``seq_kd: true``) or the dataset's own replies are used. The loss
is the ``kd_loss`` divergence (default: generalized JSD, beta 0.5) on completion tokens only, fused
with the output projections; ``kd_ratio < 1`` mixes cross-entropy in on the dataset's replies.
``generation.temperature`` is the sampling temperature, ``kd_loss.temperature`` the loss's.
``lmbda_end`` moves ``lmbda`` linearly over the run. ``on_policy_loss: sampled_reverse_kl`` scores
the student's own completions instead by the sampled-token reverse KL, a policy gradient that needs
only the teacher's log-probability of each sampled token (see kdtune/losses/sampled_kl.py).
With ``teacher_server`` a vLLM-served teacher grades the completions (its top-k rows, or each sampled
token's log-probability); with ``student_server`` vLLM samples a LoRA student's completions from
its adapter, pushed every ``sync_every_n_steps`` (docs/serving.md).

The training step is this file: copy it (``kdtune cp on_policy_distillation_single_device my_gkd.py``)
and edit it — how completions are chosen, the loss on them, a metric of your own. kdtune supplies the
parts: loading, data, generation, resumable state, losses, savers and loggers.
"""

import dataclasses
import time
from pathlib import Path

import torch

import kdtune.config
from kdtune import training
from kdtune.config import instantiate
from kdtune.config.settings import OnPolicySettings
from kdtune.datasets import collate_prompts
from kdtune.errors import KDTuneError
from kdtune.losses import AlignedTeacher, ForwardKLLoss, LinearKDLoss, SampledReverseKLLoss, token_logprobs
from kdtune.serving import ServedSampler
from kdtune.tokenization.alignment import Retokenizer
from kdtune.training.on_policy import OnPolicyBatches, check_plain_sampling, check_replies, completion_batch


@kdtune.config.parse(OnPolicySettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    # 1. Settings, output folder and prompts: everything that can be checked before a weight loads.
    run = training.RunContext(cfg, s)
    if s.teacher_server and s.seq_kd:
        raise KDTuneError("seq_kd: the teacher writes completions with kdtune's sampler, so it needs the "
                          "teacher itself (teacher_checkpointer), not teacher_server")
    if s.student_server and s.on_policy_loss == "sampled_reverse_kl" and s.student_server.sync_every_n_steps > 1 \
            and s.generation.temperature != 1:
        raise KDTuneError("student_server.sync_every_n_steps: samples from an adapter older than the student "
                          "are weighted by the server's log-probabilities, which vLLM gives at temperature 1; "
                          "with generation.temperature != 1 push the adapter every step (sync_every_n_steps: 1)")
    kd = training.distillation_parts(cfg)  # a served teacher is asked here whether it is the one
    if kd.teacher_cache:
        raise KDTuneError("teacher_logits_cache: on-policy distillation grades the student's own samples, "
                          "so it needs the teacher itself (teacher_checkpointer or teacher_server)")
    if kd.hidden_state_loss:
        raise KDTuneError("hidden_state_loss: on-policy distillation matches output distributions only; use "
                          "knowledge_distillation_single_device for intermediate-layer losses")
    tokenizer = kd.tokenizer
    if kd.teacher_tokenizer and (s.seq_kd or s.on_policy_loss == "sampled_reverse_kl"):
        raise KDTuneError(f"teacher_tokenizer: {'seq_kd' if s.seq_kd else 'on_policy_loss: sampled_reverse_kl'} "
                          f"needs the teacher's scores of the student's own tokens, which a teacher of another "
                          f"tokenizer does not give; use the divergence on its aligned spans (kd_loss: uld or hybrid_uld)")
    if kd.teacher_tokenizer and kd.teacher_server:
        raise KDTuneError("teacher_server: grading the student's completions across tokenizers needs the teacher "
                          "itself (teacher_checkpointer); a served teacher of another tokenizer serves the KD recipes")
    # a teacher of another tokenizer reads each completion rewritten in its tokens, aligned with the student's
    retokenize = Retokenizer(tokenizer, kd.teacher_tokenizer, tokenizer.eos_ids) if kd.teacher_tokenizer else None
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer, **kd.dataset_args)  # prompts, reference replies if any
    lowest_lmbda = s.lmbda if s.lmbda_end is None else min(s.lmbda, s.lmbda_end)
    check_replies(lmbda=lowest_lmbda, seq_kd=s.seq_kd, dataset=dataset)
    if s.on_policy_loss == "sampled_reverse_kl":
        check_plain_sampling(s.generation, cfg.get("model"))
    training.check_positions(dataset, *kd.checkpointers, extra=s.generation.max_new_tokens)
    training.check_memory_plan(run.device, run.dtype, kd.checkpointer, cfg.get("model"), cfg.optimizer,
                               kd.teacher_checkpointer, cfg.get("teacher"))  # weights and optimizer state fit
    steps = training.StepBatches(dataset, batch_size=s.batch_size, collate_fn=lambda b: collate_prompts(b, tokenizer.pad_id),
                                 seed=run.seed, shuffle=s.shuffle, max_steps_per_epoch=s.max_steps_per_epoch,
                                 gradient_accumulation_steps=s.gradient_accumulation_steps, dist=run.dist)
    replies = s.generation.max_new_tokens  # the dataset's replies are cut as long as a generated one can be

    def reference_batch(samples):  # prompts with the dataset's replies, for validation
        return completion_batch([x["prompt"] for x in samples], [x["completion"][:replies] for x in samples],
                                stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, retokenize=retokenize,
                                teacher_prompts=[x["teacher_prompt"] for x in samples] if retokenize else None)

    val_batches = training.build_validation(cfg, s, tokenizer, reference_batch, run.dist, dataset_args=kd.dataset_args)
    sampler = None  # with student_server, vLLM samples the LoRA student's completions from its pushed adapter
    if s.student_server is not None:
        if not (cfg.get("model") or {}).get("lora_rank"):
            raise KDTuneError("student_server: vLLM samples a LoRA student (model.lora_rank) from its pushed "
                              "adapter; a full-weight student samples with kdtune's own generator")
        sampler = ServedSampler(**dataclasses.asdict(s.student_server), adapter_dir=Path(s.output_dir) / "adapters")
        sampler.check(tokenizer)

    # 2. The models: a trainable student and a frozen teacher (none when the teacher is served).
    student = training.load_student(kd.checkpointer, cfg.get("model"), device=run.device, dtype=run.dtype,
                                    resume_dir=run.resume_dir)
    print(training.describe_trainable(student))  # what trains, in one line
    teacher = None if kd.teacher_checkpointer is None else training.load_teacher(
        kd.teacher_checkpointer, cfg.get("teacher"), device=run.device, dtype=run.dtype)
    if s.compile:  # each decoder layer on its own: the first steps run slower while they compile
        for layer in student.layers:
            layer.compile()

    # 3. Each step's completions (student, teacher or dataset); optimizer, schedule, losses, saver, the
    # state a resume restores (the completion source's generators included); then the run starts.
    completions = OnPolicyBatches(student, teacher, lmbda=s.lmbda, seq_kd=s.seq_kd, seed=run.seed,
                                  generation=dataclasses.asdict(s.generation), stop_ids=tokenizer.eos_ids,
                                  pad_id=tokenizer.pad_id, vocab_size=kd.divergence.vocab_size, device=run.device,
                                  lmbda_end=s.lmbda_end, num_steps=s.epochs * steps.steps_per_epoch, sampler=sampler,
                                  retokenize=retokenize)
    params = [p for p in student.parameters() if p.requires_grad]
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
    # on_policy_loss: sampled_reverse_kl scores the student's own completions by a policy gradient instead
    sampled_kl = SampledReverseKLLoss(vocab_size=kd.divergence.vocab_size, softcap_value=caps["student_softcap"],
                                      chunk_size=s.loss_chunk_size) if s.on_policy_loss == "sampled_reverse_kl" else None
    save = training.student_saver(kd.checkpointer, student)
    state = training.TrainingState(run.dist)
    state.register("optimizer", run.dist.optimizer_state(student, optimizer))
    state.register("lr_scheduler", lr_scheduler)
    state.register("completions", completions)
    if run.resume_dir is not None:
        state.load(run.resume_dir)
    run.start(dataset=dataset, tokenizer=tokenizer, step=state.global_step)  # checks passed: lock, record
    logger = training.build_metric_logger(cfg.get("metric_logger"), run.output_dir, run.dist)

    def teacher_logprobs(teacher_hidden, teacher_weight, labels):
        """The teacher's log-probability of each labelled token (all the sampled estimator needs of it)."""
        if teacher_weight is None:  # a served teacher's rows carry them
            return teacher_hidden.label_logprobs
        with torch.no_grad():
            keep = labels != -100
            return token_logprobs(teacher_hidden[keep], teacher_weight, labels[keep],
                                  vocab_size=kd.divergence.vocab_size, softcap_value=caps["teacher_softcap"],
                                  chunk_size=s.loss_chunk_size)

    def forward(batch):
        """The student's and the teacher's final hidden states, and the teacher's output weight (a
        served teacher: its top-k rows for the batch, and no weight)."""
        inputs = {"mask": batch.get("mask"), "input_pos": batch.get("input_pos"), "return_hidden": True}
        hidden = student(batch["tokens"], **inputs)
        if teacher is None:
            return hidden, kd.teacher_server.batch_topk(batch), None
        if "spans" in batch:  # a teacher of another tokenizer reads its own encoding of each completion
            with torch.no_grad():
                teacher_hidden = teacher(batch["teacher_tokens"], return_hidden=True)
            return hidden, AlignedTeacher(teacher_hidden, batch["teacher_tokens"], batch["spans"]), teacher.output_weight
        with torch.no_grad():
            return hidden, teacher(batch["tokens"], **inputs), teacher.output_weight

    def validate(kd_ratio: float, temperature: float) -> dict:
        """Held-out losses on the validation set's reference replies, of the student as it is now."""
        student.eval()
        num_tokens = training.step_tokens(val_batches, run.dist)
        metrics = training.StepMetrics()
        with torch.no_grad(), run.autocast():
            for batch in val_batches:
                batch = training.to_device(batch, run.device)
                hidden, teacher_hidden, teacher_weight = forward(batch)
                heads = (hidden, student.output_weight, teacher_hidden, teacher_weight, batch["labels"])
                ce, kd_term = kd_loss(*heads, kd_ratio=kd_ratio, num_tokens=num_tokens, temperature=temperature)
                kl = kl_to_teacher(*heads, kd_ratio=1.0, num_tokens=num_tokens)[1]
                metrics.add(val_loss=(1 - kd_ratio) * ce + kd_ratio * kd_term, val_ce_loss=ce, val_kd_loss=kd_term,
                            val_kl=kl)
        student.train()
        return metrics.reduce(run.dist)

    # 4. Train: each step makes its completions, accumulates the gradients of its micro-batches, steps.
    bar = training.progress_bar(s.epochs * steps.steps_per_epoch, state.global_step, run.dist)
    last_checkpoint = run.resume_dir
    student.train()
    while state.epoch < s.epochs:
        for prompts in steps.epoch(state):  # state.global_step now numbers this step
            start = time.perf_counter()
            temperature = kd.divergence.temperature  # the loss's, this step (a schedule may vary it)
            sampling_temperature = s.generation.temperature  # what the student's completions were drawn at
            if sampler and sampler.stale(state.global_step):
                sampler.push(student, state.global_step)  # the server samples from the adapter as it is now
            micro, generation_metrics = completions(prompts)  # batches marked "generated" or not
            num_tokens = training.step_tokens(micro, run.dist)  # completion tokens of all micro-batches
            metrics = training.StepMetrics()
            for batch in micro:
                kd_ratio = 1.0 if batch["generated"] else s.kd_ratio  # generated completions: the divergence alone
                batch = training.to_device(batch, run.device)
                with run.autocast():  # bf16 matmuls when autocast is set; the loss math stays float32
                    hidden, teacher_hidden, teacher_weight = forward(batch)
                    if sampled_kl is not None and batch["student_written"]:  # a policy gradient on its own tokens
                        scores = teacher_logprobs(teacher_hidden, teacher_weight, batch["labels"])
                        kd_term, estimate = sampled_kl(hidden, student.output_weight, scores, batch["labels"],
                                                       num_tokens=num_tokens, sampling_temperature=sampling_temperature,
                                                       behavior_logprobs=batch.get("behavior_logprobs"))
                        ce = torch.zeros_like(estimate)
                    else:
                        ce, kd_term = kd_loss(hidden, student.output_weight, teacher_hidden, teacher_weight,
                                              batch["labels"], kd_ratio=kd_ratio, num_tokens=num_tokens,
                                              temperature=temperature)
                        estimate = kd_term
                loss = (1 - kd_ratio) * ce + kd_ratio * kd_term
                run.dist.backward(loss)
                # the sampled estimator's loss is a surrogate: log its reverse-KL estimate instead
                metrics.add(loss=(1 - kd_ratio) * ce + kd_ratio * estimate, ce_loss=ce, kd_loss=estimate)
            values = {**metrics.reduce(run.dist), **generation_metrics}
            training.check_finite(values["loss"], state.global_step, last_checkpoint)
            if s.clip_grad_norm is not None:
                values["grad_norm"] = run.dist.clip_grad_norm(params, s.clip_grad_norm)
            values["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            values.update(kd_ratio=s.kd_ratio, num_tokens=num_tokens, peak_memory_gb=training.peak_memory_gb(run.device),
                          tokens_per_second=num_tokens / run.dist.world_size / (time.perf_counter() - start))
            if val_batches and state.global_step % s.validation.every_n_steps == 0:
                values.update(validate(s.kd_ratio, temperature))
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
    if sampler:
        sampler.close()
    if logger:
        logger.close()


if __name__ == "__main__":
    main()
