"""The suite's `kdtune` runner (tests/cli_utils.py) forks runs from a warm process: each run must
still see its own directory, environment, output and exit status as a new process would, and a run
whose environment changes what torch reads at import must be a plain subprocess."""

import json
import os

from tests import cli_utils
from tests.cli_utils import ASSETS, run_kdtune

RECIPE = """
import json, os, sys
import kdtune.config


@kdtune.config.parse
def main(cfg):
    print(json.dumps({"cwd": os.getcwd(), "marker": os.environ.get("KDTUNE_TEST_MARKER"),
                      "main": __name__, "stdin": sys.stdin.read()}))
    print("to stderr", file=sys.stderr)
    if os.environ.get("KDTUNE_TEST_CRASH"):
        raise RuntimeError("kaboom")


if __name__ == "__main__":
    main()
"""


def test_a_forked_run_has_its_own_directory_environment_output_and_status(tmp_path):
    (tmp_path / "r.py").write_text(RECIPE)
    args = ("run", "r.py", "--config", ASSETS / "echo.yaml", f"output_dir={tmp_path / 'out'}")
    for marker in ("one", "two"):  # nothing of one run's environment stays for the next
        proc = run_kdtune(*args, cwd=tmp_path, env={"KDTUNE_TEST_MARKER": marker})
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        assert seen == {"cwd": str(tmp_path.resolve()), "marker": marker, "main": "__main__", "stdin": ""}
        assert proc.stderr.strip().splitlines()[-1] == "to stderr"
    crash = run_kdtune(*args, cwd=tmp_path, env={"KDTUNE_TEST_CRASH": "1"})
    assert crash.returncode == 1 and "Traceback" in crash.stderr and "RuntimeError: kaboom" in crash.stderr
    user_error = run_kdtune("cp", "no_such_recipe", tmp_path)
    assert user_error.returncode == 2 and user_error.stderr.startswith("kdtune: error:")


def test_what_torch_reads_at_import_decides_fork_or_subprocess():
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert cli_utils._imports_alike(base)
    assert cli_utils._imports_alike({**base, "KDTUNE_TEST_MARKER": "x"})  # torch never reads it
    assert not cli_utils._imports_alike({**base, "OMP_NUM_THREADS": "7"})
    assert not cli_utils._imports_alike({**base, "THP_MEM_ALLOC_ENABLE": "0"})
    assert not cli_utils._imports_alike({**base, "PYTHONPATH": "/elsewhere"})


def test_a_plain_subprocess_where_the_import_would_differ(monkeypatch):
    monkeypatch.setattr(cli_utils, "_warm_server", lambda: (_ for _ in ()).throw(AssertionError("forked")))
    proc = run_kdtune("--help", env={"OMP_NUM_THREADS": "3"})
    assert proc.returncode == 0 and "usage" in proc.stdout
