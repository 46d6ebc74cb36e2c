"""Running the `kdtune` command as a user would, in a process of its own.

Every run is a new process running ``python -m kdtune.cli.main ARGS`` with the given environment,
working directory, captured stdout/stderr and exit status. Importing torch takes about 2 s of each,
so runs are forked from a warm process that has imported torch and kdtune's libraries (one per
pytest worker): the child changes to the run's directory and environment and runs the
module as ``python -m`` would. Where the environment changes what torch reads when it is imported
(thread counts, the allocator, paths), the run is a plain subprocess instead.
"""

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"

_IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "GOMP_", "THP_", "TORCH", "PYTHON", "LD_", "CUDA_", "OPENBLAS_", "GLIBC_")

# The warm process: reads one JSON request a line, forks, answers with the child's exit status.
_SERVER = r"""
import json, os, runpy, signal, sys, time, traceback, atexit
import torch  # the point of this process, with the libraries every run imports (not kdtune.cli.main
import kdtune.checkpointing, kdtune.config, kdtune.tokenization, kdtune.training  # itself: runpy runs it)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.argv = ["kdtune.cli.main", *request["args"]]
            try:
                runpy.run_module("kdtune.cli.main", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    deadline = time.monotonic() + request["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            code = "timeout"
            break
        time.sleep(0.01)
    print(json.dumps({"code": code}), flush=True)
"""

_server: subprocess.Popen | None = None
_server_env: dict | None = None
_lock = threading.Lock()


def _as_kdtune_imports(env: dict) -> dict:
    return {"THP_MEM_ALLOC_ENABLE": "1", **env}  # what `kdtune` sets before importing torch


def _warm_server() -> subprocess.Popen:
    global _server, _server_env
    if _server is None or _server.poll() is not None:
        _server_env = _as_kdtune_imports({**os.environ, "PYTHONUNBUFFERED": "1"})
        _server = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, env=_server_env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return _server


def _imports_alike(env: dict) -> bool:
    """Whether torch, imported under the warm process's environment, is what ``env`` would import."""
    reference = _server_env or _as_kdtune_imports({**os.environ, "PYTHONUNBUFFERED": "1"})
    env = _as_kdtune_imports(env)
    keys = {k for k in reference.keys() | env.keys() if k.startswith(_IMPORT_TIME)}
    return all(reference.get(k) == env.get(k) for k in keys)


def run_kdtune(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("KDTUNE_DEBUG", None) if env is None or "KDTUNE_DEBUG" not in env else None
    args = [str(a) for a in args]
    command = [sys.executable, "-m", "kdtune.cli.main", *args]
    if not hasattr(os, "fork") or not _imports_alike(full_env):
        return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    with _lock, tempfile.TemporaryDirectory() as tmp:
        server = _warm_server()
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"args": args, "cwd": str(Path(cwd or os.getcwd()).resolve()), "env": full_env,
                   "stdout": str(out), "stderr": str(err), "timeout": timeout}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], timeout + 60)
        reply = server.stdout.readline() if ready else ""
        if not reply:
            server.kill()
            raise RuntimeError("the warm kdtune process died")
        code = json.loads(reply)["code"]
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if code == "timeout":
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, code, stdout, stderr)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, exactly one stderr line starting `kdtune: error:`, and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("kdtune: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
