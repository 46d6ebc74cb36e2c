"""A LoRA student's own completions, sampled by vLLM: the server runs the student's frozen base model
(``vllm serve BASE --enable-lora``) and the trained adapter is pushed to it (saved in PEFT format,
``/v1/load_lora_adapter``) whenever it is stale, so on-policy samples come from a fast engine while
kdtune trains. Each push is a new adapter version; the previous one is unloaded. The adapter folder
must be readable by the server at the same path (one machine, or a shared file system).

A full-weight student keeps kdtune's own sampler: pushing all its weights every few steps would cost
more than sampling natively at the sizes that train on one device.
"""

import shutil
from pathlib import Path

from kdtune.checkpointing.peft import save_peft_adapter
from kdtune.errors import KDTuneError
from kdtune.serving.client import ServerClient, ServerError
from kdtune.serving.teacher import check_served_model


class ServedSampler:
    def __init__(self, *, base_url: str, model: str, adapter_dir: str | Path, sync_every_n_steps: int = 1,
                 max_concurrency: int = 8, timeout_s: float = 120.0, retries: int = 3, name: str = "kdtune-student"):
        self.client = ServerClient(base_url, timeout_s=timeout_s, retries=retries, max_concurrency=max_concurrency,
                                   what="student_server")
        self.model, self.adapter_dir, self.name = model, Path(adapter_dir), name
        self.sync_every_n_steps = sync_every_n_steps
        self.version: int | None = None  # the step whose weights the server holds; None: nothing pushed yet

    def check(self, tokenizer) -> None:
        """The server is up, serves the student's base model and tokenizes as ``tokenizer`` does."""
        check_served_model(self.client, self.model, tokenizer, "student_server")

    def stale(self, step: int) -> bool:
        """Whether the adapter must be pushed before sampling step ``step`` (1-based): nothing pushed
        yet in this process (a resumed run too), or ``sync_every_n_steps`` steps since the last push."""
        return self.version is None or step - self.version >= self.sync_every_n_steps

    def push(self, student, step: int) -> None:
        """Save the student's adapter and load it into the server as version ``step``; unload and
        delete the previous version."""
        folder = self.adapter_dir / f"v{step}"
        if folder.exists():
            shutil.rmtree(folder)
        save_peft_adapter(student, folder)
        try:
            self.client.post("/v1/load_lora_adapter", {"lora_name": self._name(step), "lora_path": str(folder)})
        except ServerError as e:
            raise KDTuneError(f"student_server: the server at {self.client.api} did not load the student's adapter "
                              f"({e.detail}); serve the base model with --enable-lora, --max-lora-rank at least the "
                              f"student's lora_rank, and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True") from None
        previous, self.version = self.version, step
        if previous is not None:
            self.client.post("/v1/unload_lora_adapter", {"lora_name": self._name(previous)})
            shutil.rmtree(self.adapter_dir / f"v{previous}", ignore_errors=True)

    def close(self) -> None:
        """Unload the last adapter from the server (its folder stays in ``adapter_dir``)."""
        if self.version is not None:
            self.client.post("/v1/unload_lora_adapter", {"lora_name": self._name(self.version)})
            self.version = None

    def _name(self, version: int) -> str:
        return f"{self.name}-v{version}"

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_k: int | None,
               top_p: float | None, stop_ids, seed: int) -> tuple[list[list[int]], list[list[float]]]:
        """One completion per prompt (token ids, through the first stop token), sampled by the server
        from the pushed adapter, and the adapter's log-probability of each sampled token (at
        temperature 1: vLLM's raw log-probabilities). Request i is seeded with ``seed + i``, so a
        rerun draws the same."""
        body = {"model": self._name(self.version), "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": 1.0 if top_p is None else top_p, "top_k": -1 if top_k is None else top_k,
                "stop_token_ids": list(stop_ids), "return_token_ids": True, "skip_special_tokens": False,
                "logprobs": 0}

        def one(i):
            choice = self.client.post("/v1/completions", {**body, "prompt": prompts[i], "seed": seed + i})["choices"][0]
            return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])

        answers = self.client.map(one, range(len(prompts)))
        return [ids for ids, _ in answers], [lps for _, lps in answers]
