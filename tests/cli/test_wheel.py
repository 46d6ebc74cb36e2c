"""A wheel built from the repository carries its recipes and configs: `kdtune ls` and `cp` work
from a plain install into a fresh venv, away from the checkout."""

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
    for name, src in builtins.items():
        dest = work / (name.replace("/", "__") + src.suffix)  # families share config file names
        proc = kdtune("cp", name, dest)
        assert proc.returncode == 0, proc.stderr
        assert dest.read_bytes() == src.read_bytes()
