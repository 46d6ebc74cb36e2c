"""Where each optimizer step's completions come from in on-policy distillation (GKD, Agarwal et
al., arXiv 2306.13649), and the training batches made from them.

Every step draws once from a generator seeded by the run's seed: with probability ``lmbda`` the
current student writes the completions of the step's prompts (on-policy); otherwise the teacher
writes them when ``seq_kd`` is set (sequence-level KD), else the dataset's own replies are used
(supervised KD). Only completion tokens are scored. Generated completions are scored by the
divergence alone (the recipe's loss mix uses kd_ratio 1 on them); the dataset's replies by
``(1 - kd_ratio) * CE + kd_ratio * divergence``.
"""

import time

import torch
from torch import nn

from kdtune.datasets import collate, prompt_completion_sample
from kdtune.errors import KDTuneError
from kdtune.generation import generate
from kdtune.training.distribution import Distribution


def check_replies(*, lmbda: float, seq_kd: bool, dataset) -> None:
    """Refuse, before any weight loads, a prompt-only dataset when some steps train on its replies."""
    if lmbda < 1 and not seq_kd:
        missing = next((i for i in range(len(dataset)) if not dataset[i]["completion"]), None)
        if missing is not None:
            raise KDTuneError(f"dataset: sample {missing} has no reference reply, which lmbda={lmbda} with "
                              f"seq_kd=false trains on; use a dataset with replies, lmbda=1 (the student "
                              f"writes every completion) or seq_kd=true (the teacher writes them)")


def check_plain_sampling(generation, model_node=None) -> None:
    """The sampled-token estimator's importance weights correct for the sampling temperature only: a
    truncated sampler (top-k, top-p), greedy decoding, or LoRA dropout (sampling runs without it,
    the loss with it) is refused before anything loads."""
    if generation.temperature == 0 or generation.top_k is not None or (generation.top_p or 1.0) < 1:
        raise KDTuneError(f"generation: on_policy_loss=sampled_reverse_kl needs plain sampling (temperature > 0, "
                          f"top_k null, top_p 1), got temperature {generation.temperature}, top_k "
                          f"{generation.top_k}, top_p {generation.top_p}: its importance weights model the "
                          f"temperature only")
    if (model_node or {}).get("lora_dropout"):
        raise KDTuneError("model.lora_dropout: on_policy_loss=sampled_reverse_kl needs 0: samples are drawn "
                          "without dropout, so the loss's log-probabilities must be too")


def completion_batch(prompts: list[list[int]], completions: list[list[int]], *, stop_ids, pad_id: int,
                     teacher_prompts: list[list[int]] | None = None, retokenize=None) -> dict:
    """Right-padded ``tokens``/``labels`` of prompt + completion rows in which only completion tokens
    are learned, up to and including the first stop token: prompts, anything after that stop token
    and padding are ignored. With ``teacher_prompts`` and ``retokenize`` (a `Retokenizer`: a teacher
    of another tokenizer) each row is also written in the teacher's tokens, ``teacher_tokens`` and
    the aligned ``spans`` of the completions (see `collate`)."""
    samples = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        completion = through_first_stop(completion, stop_ids)
        sample = prompt_completion_sample(prompt, completion)
        if teacher_prompts is not None:
            theirs, spans = retokenize(completion)
            n, m = len(prompt), len(teacher_prompts[i])
            sample["teacher_tokens"] = list(teacher_prompts[i]) + theirs
            sample["spans"] = [[n + s0, n + s1, m + t0, m + t1] for s0, s1, t0, t1 in spans]
        samples.append(sample)
    return collate(samples, pad_id)


def through_first_stop(ids: list[int], stop_ids) -> list[int]:
    """``ids`` up to and including the first stop token."""
    stops = set(stop_ids)
    end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
    return list(ids[:end])


def unpadded_prompts(batch: dict) -> list[list[int]]:
    """The id lists of a `collate_prompts` batch (left-padded ``prompt`` and ``prompt_lengths``)."""
    width = batch["prompt"].shape[1]
    return [row[width - n :].tolist() for row, n in zip(batch["prompt"], batch["prompt_lengths"].tolist())]


class OnPolicyBatches:
    """Each step's training batches from its prompt batches: picks the step's completion source,
    generates when it is a model, and returns the batches (marked ``generated``) with the step's
    generation metrics. A stateful object: register it with the run's `TrainingState`.

    ``generation`` holds `generate`'s ``max_new_tokens``, ``temperature``, ``top_k`` and ``top_p``;
    the dataset's replies are cut to ``max_new_tokens`` too, so a step's memory does not depend on
    where its completions came from.
    The source draw and the sampling have generators of their own, seeded by ``seed`` and saved in
    the recipe state, so a resumed run draws and samples what the uninterrupted run would.
    Under a sharded ``dist`` (the distributed recipe) every rank draws the same source and samples
    its own prompts with its own generator; a model generates with its weights gathered, so its
    forwards need no collective and each rank stops when its own rows have.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, lmbda: float, seq_kd: bool, seed: int,
                 generation: dict, stop_ids, pad_id: int, vocab_size: int, device: torch.device,
                 lmbda_end: float | None = None, num_steps: int = 1, sampler=None, dist: Distribution | None = None,
                 retokenize=None):
        self.student, self.teacher, self.lmbda, self.seq_kd = student, teacher, lmbda, seq_kd
        self.sampler = sampler  # a `kdtune.serving.ServedSampler`: the student's completions come from vLLM
        self.lmbda_end, self.num_steps = lmbda_end, num_steps
        self.generation = dict(generation)
        self.stop_ids, self.pad_id, self.vocab_size = tuple(stop_ids), pad_id, vocab_size
        self.dist = dist or Distribution()
        self.retokenize = retokenize  # a teacher of another tokenizer: completions rewritten in its tokens
        self.draws = torch.Generator().manual_seed(seed)  # the same on every rank: they generate together
        self.sampling = torch.Generator(device).manual_seed(seed + self.dist.rank)
        self.steps = self.on_policy_steps = 0

    def current_lmbda(self) -> float:
        """``lmbda`` for the coming step: constant, or linear from ``lmbda`` at the first of
        ``num_steps`` steps to ``lmbda_end`` at the last."""
        if self.lmbda_end is None:
            return self.lmbda
        progress = min(self.steps / (self.num_steps - 1), 1.0) if self.num_steps > 1 else 1.0
        return self.lmbda + (self.lmbda_end - self.lmbda) * progress

    def next_source(self) -> str:
        """``student``, ``teacher`` or ``dataset``: one draw per step whatever ``lmbda`` is, so the
        draws stay aligned with the steps."""
        on_policy = torch.rand((), generator=self.draws).item() < self.current_lmbda()
        return "student" if on_policy else "teacher" if self.seq_kd else "dataset"

    def __call__(self, micro: list[dict]) -> tuple[list[dict], dict[str, float]]:
        lmbda = self.current_lmbda()
        source = self.next_source()
        self.steps += 1
        self.on_policy_steps += source == "student"
        metrics = {"lmbda": lmbda, "on_policy_fraction": self.on_policy_steps / self.steps}
        batches, rows, generated, seconds = [], 0, 0, 0.0
        for batch in micro:
            prompts, behavior = unpadded_prompts(batch), None
            if source == "dataset":
                completions = [c[: self.generation["max_new_tokens"]] for c in batch["completions"]]
            elif source == "student" and self.sampler is not None:
                start = time.perf_counter()
                seed = int(torch.randint(0, 2**31 - 1 - len(prompts), (), generator=self.sampling,
                                         device=self.sampling.device))  # saved with the state: a resume redraws it
                completions, logprobs = self.sampler.sample(prompts, stop_ids=self.stop_ids, seed=seed,
                                                            **self.generation)
                seconds += time.perf_counter() - start
                rows, generated = rows + len(prompts), generated + sum(map(len, completions))
                metrics["adapter_version"] = self.sampler.version  # which pushed weights wrote them
                if self.sampler.version != self.steps:  # an older adapter wrote them: weight by its probabilities
                    behavior = torch.tensor([lp for c, lps in zip(completions, logprobs)
                                             for lp in lps[:len(through_first_stop(c, self.stop_ids))]])
            else:
                start = time.perf_counter()
                with self.dist.gathered(self.student if source == "student" else self.teacher) as model:
                    out = generate(model, prompts, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                   vocab_size=self.vocab_size, generator=self.sampling, **self.generation)
                seconds += time.perf_counter() - start  # generate syncs the device as it decides to stop
                completions = out.completions
                rows, generated = rows + len(prompts), generated + int(out.completion_lens.sum())
            train = completion_batch(prompts, completions, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                     teacher_prompts=batch.get("teacher_prompts"), retokenize=self.retokenize)
            if behavior is not None:
                train["behavior_logprobs"] = behavior  # one per learned token, in the labels' order
            batches.append({**train, "generated": source != "dataset", "student_written": source == "student"})
        if source != "dataset":  # over every rank's completions
            rows, generated, seconds = self.dist.all_reduce(torch.tensor([rows, generated, seconds], dtype=torch.float64))
            metrics["generated_length_mean"] = float(generated / rows)
            metrics["generation_tokens_per_second"] = float(generated / seconds)
        return batches, metrics

    def state_dict(self) -> dict:
        return {"draws": self.draws.get_state(), "sampling": self.sampling.get_state(),
                "steps": self.steps, "on_policy_steps": self.on_policy_steps}

    def load_state_dict(self, state: dict) -> None:
        self.draws.set_state(state["draws"])
        self.sampling.set_state(state["sampling"])
        self.steps, self.on_policy_steps = state["steps"], state["on_policy_steps"]
