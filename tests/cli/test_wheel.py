"""A wheel built from the repository carries its recipes and configs: `kdtune ls` and `cp` work
from a plain install into a fresh venv, away from the checkout."""

import json
import subprocess
import sys
import sysconfig
import venv

from kdtune.config.builtins import available_configs, available_recipes
from tests.cli_utils import REPO


def test_wheel_lists_and_copies_builtins(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", dist, REPO], check=True, capture_output=True)
    wheel = next(dist.glob("kdtune-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    target = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target,
                    wheel], check=True, capture_output=True)
    # The dependencies come from this environment; kdtune itself only from the wheel.
    deps = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def kdtune(*args):
        return subprocess.run([py, "-m", "kdtune.cli.main", *map(str, args)], cwd=work, env=env,
                              capture_output=True, text=True)

    where = subprocess.run([py, "-c", "import kdtune; print(kdtune.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where and str(REPO) not in where
    proc = kdtune("ls")
    assert proc.returncode == 0, proc.stderr
    for name in available_recipes():
        assert name in proc.stdout
    builtins = {**available_recipes(), **available_configs()}
    assert builtins, "the checkout ships recipes and configs"
    # families share config file names: the copies are named after the whole built-in name
    dests = {name: work / (name.replace("/", "__") + src.suffix) for name, src in builtins.items()}
    # One process copies them all through the CLI's entry point (a process per copy would spend
    # minutes importing torch); a copy that fails prints its name.
    copy_all = ("import json, sys\nfrom kdtune.cli.main import main\n"
                "for name, dest in json.loads(sys.argv[1]).items():\n"
                "    if main(['cp', name, dest]) not in (0, None): print('FAILED', name)\n")
    proc = subprocess.run([py, "-c", copy_all, json.dumps({n: str(d) for n, d in dests.items()})], cwd=work, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "FAILED" not in proc.stdout, proc.stdout + proc.stderr
    for name, src in builtins.items():
        assert dests[name].read_bytes() == src.read_bytes(), name
