"""A teacher served by vLLM (or any server of the OpenAI completions API with vLLM's
``prompt_logprobs``): token ids in, the teacher's top-k log-probabilities at every position out, as
the rows a teacher cache holds.

Each sample is one completions request (``prompt`` as a list of ids, ``max_tokens: 1``,
``prompt_logprobs: top_k``); up to ``max_concurrency`` are in flight and the server batches them.
The answer's ``prompt_logprobs[j]`` is the distribution of token j given the tokens before it, so a
trained position t (whose label is token t + 1) takes entry t + 1. The server returns the prompt's
own token beside the top k when it ranks lower; only ranks 1..k are kept.
"""

from dataclasses import dataclass

import torch

from kdtune.datasets import IGNORE_INDEX
from kdtune.errors import KDTuneError
from kdtune.losses import TeacherTopK
from kdtune.offline.dataset import rows_at
from kdtune.serving.client import ServerClient, ServerError
from kdtune.serving.temperature import temper_topk

# Texts whose tokenization tells tokenizers apart: words, digits, spaces, code, other scripts, emoji.
PROBES = ("Hello world! The year 2024 had 366 days.", "  leading spaces\tand\ttabs\n\nnew lines",
          "def f(x):\n    return x**2  # squared", "naïve café, Straße, 東京, Москва, 🙂👍",
          "1234567890 3.14159 -42 1e-5")


def check_served_model(client: ServerClient, model: str, tokenizer, what: str) -> int | None:
    """The server at ``client`` is up, serves ``model``, and its tokenizer is ``tokenizer`` (probe
    texts encode alike; the last id decodes alike and no id follows it); one line saying which is
    not so, otherwise. Returns the model's ``max_model_len``."""
    served = {m.get("id"): m for m in client.get("/v1/models").get("data", [])}
    if model not in served:
        raise KDTuneError(f"{what}.model: the server at {client.api} serves "
                          f"{', '.join(map(repr, served)) or 'no model'}, not '{model}'")
    for text in PROBES:
        theirs = client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})["tokens"]
        ours = tokenizer.encode(text, add_special_tokens=False)
        if theirs != ours:
            raise KDTuneError(f"{what}: the served model's tokenizer differs from the student's ({tokenizer.path}): "
                              f"{text!r} is {theirs[:8]}... there, {ours[:8]}... here; the served model must share "
                              f"the student's tokenizer")

    def detokenize(ids):
        try:
            return client.post("/detokenize", {"model": model, "tokens": ids})["prompt"]
        except ServerError:
            return None  # an id the server's tokenizer does not have

    last = tokenizer.vocab_size - 1
    theirs_last, beyond = detokenize([last]), detokenize([tokenizer.vocab_size])
    if theirs_last != tokenizer.decode([last]) or beyond not in ("", None):
        raise KDTuneError(f"{what}: the served tokenizer's vocabulary is not the student's {tokenizer.vocab_size:,} "
                          f"tokens (id {last} is {theirs_last!r} there, {tokenizer.decode([last])!r} here; id "
                          f"{tokenizer.vocab_size} is {beyond!r} there)")
    return served[model].get("max_model_len")


class ServedTeacher:
    """The teacher at ``base_url`` serving ``model``; `check` it against the student's tokenizer
    before training. ``temperature`` is the KD temperature, applied to the served rows (`temper_topk`)."""

    def __init__(self, *, base_url: str, model: str, top_k: int = 20, max_concurrency: int = 8,
                 timeout_s: float = 120.0, retries: int = 3, temperature: float = 1.0, vocab_size: int):
        self.client = ServerClient(base_url, timeout_s=timeout_s, retries=retries, max_concurrency=max_concurrency)
        self.model, self.top_k, self.temperature, self.vocab_size = model, top_k, temperature, vocab_size
        self.max_model_len: int | None = None

    def describe(self) -> dict:
        """What a cache records of this teacher (the address is not part of it: a restarted server
        may listen elsewhere)."""
        return {"server_model": self.model, "temperature_rule": "topk_tail_geometric_mean"}

    # -- checks, before any weight loads -------------------------------------------------------------

    def check(self, tokenizer) -> None:
        """The server is up, serves ``model``, tokenizes as ``tokenizer`` does, has its vocabulary
        size, and allows ``top_k`` log-probabilities; one line saying which is not so, otherwise."""
        self.max_model_len = check_served_model(self.client, self.model, tokenizer, "teacher_server")
        try:
            self._prompt_logprobs([tokenizer.encode("a b", add_special_tokens=False)[0]] * 2)
        except ServerError as e:
            if e.status == 400 and "logprobs" in e.detail:
                raise KDTuneError(f"teacher_server.top_k: the server refuses {self.top_k} log-probabilities per "
                                  f"token ({e.detail}); start vLLM with --max-logprobs {self.top_k} or lower top_k"
                                  ) from None
            raise

    # -- rows ------------------------------------------------------------------------------------------

    def _prompt_logprobs(self, tokens: list[int]) -> list:
        body = {"model": self.model, "prompt": tokens, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.top_k}
        return self.client.post("/v1/completions", body)["choices"][0]["prompt_logprobs"]

    def sequence_rows(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, ...]:
        """Top-k log-probabilities (float32, at the KD temperature) and ids, ``[len(positions), k]``,
        of the distributions that predict ``tokens[t + 1]`` for each t in ``positions``, and the
        log-probability of ``tokens[t + 1]`` itself ``[len(positions)]`` (temperature 1: what the
        sampled-token estimator scores)."""
        k = self.top_k
        if not positions:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long), torch.empty(0)
        if self.max_model_len is not None and len(tokens) > self.max_model_len:
            raise KDTuneError(f"teacher_server: a sample of {len(tokens)} tokens is longer than the server's "
                              f"max_model_len {self.max_model_len}; shorten the dataset's max_seq_len or serve "
                              f"with a longer --max-model-len")
        entries = self._prompt_logprobs(tokens[: max(positions) + 2])
        values = torch.empty(len(positions), k, dtype=torch.float64)
        ids = torch.empty(len(positions), k, dtype=torch.long)
        own = torch.empty(len(positions))
        for row, t in enumerate(positions):
            own[row] = entries[t + 1][str(tokens[t + 1])]["logprob"]  # always there, whatever its rank
            top = sorted(((e["rank"], int(i), e["logprob"]) for i, e in entries[t + 1].items()
                          if e.get("rank") is not None and e["rank"] <= k))[:k]
            if len(top) < k:
                raise KDTuneError(f"teacher_server: the server returned {len(top)} log-probabilities for a "
                                  f"position, not top_k={k}")
            ids[row] = torch.tensor([i for _, i, _ in top])
            values[row] = torch.tensor([lp for _, _, lp in top], dtype=torch.float64)
        if int(ids.max()) >= self.vocab_size:
            raise KDTuneError(f"teacher_server: the server ranked id {int(ids.max())}, outside the student's "
                              f"{self.vocab_size:,}-token vocabulary, among its top {k}")
        values = values.clamp_max(0.0)  # a lone candidate can come back as +1e-7
        return temper_topk(values, self.temperature, self.vocab_size), ids, own.clamp_max(0.0)

    def sample_rows(self, samples: list[dict]) -> list[tuple[torch.Tensor, ...]]:
        """`sequence_rows` of each sample's trained positions (label != -100), in order; packed
        samples (``seq_lens``) send each packed sequence on its own. Requests run concurrently."""
        jobs = []  # (sample index, tokens, positions) per request
        for index, sample in enumerate(samples):
            tokens, labels = list(sample["tokens"]), list(sample["labels"])
            start = 0
            for length in sample.get("seq_lens") or [len(tokens)]:
                part = range(start, start + length)
                jobs.append((index, tokens[part.start:part.stop],
                             [t - start for t in part if labels[t] != IGNORE_INDEX]))
                start += length
        results = self.client.map(lambda job: self.sequence_rows(job[1], job[2]), jobs)
        per_sample: list[list] = [[] for _ in samples]
        for (index, _, _), rows in zip(jobs, results):
            per_sample[index].append(rows)
        return [tuple(torch.cat(column) for column in zip(*parts)) for parts in per_sample]

    def batch_topk(self, batch: dict) -> "ServedRows":
        """The rows of a right-padded ``tokens``/``labels`` batch (the student's own completions) as
        `ServedRows` ``[B, S, k]`` on the batch's device, filled at its trained positions."""
        tokens, labels = batch["tokens"], batch["labels"]
        samples = [{"tokens": t.tolist(), "labels": lab.tolist()} for t, lab in zip(tokens.cpu(), labels.cpu())]
        logprobs, ids, own = (torch.cat(column) for column in zip(*self.sample_rows(samples)))
        rows = rows_at(labels.cpu() != IGNORE_INDEX, logprobs, ids)
        return ServedRows(rows.logprobs.to(tokens.device), rows.ids.to(tokens.device), own.to(tokens.device))


@dataclass(frozen=True)
class ServedRows(TeacherTopK):
    """A served teacher's top-k rows, plus its log-probability (temperature 1) of each trained token
    ``[N]``, in the row-major order of the trained positions."""

    label_logprobs: torch.Tensor | None = None
