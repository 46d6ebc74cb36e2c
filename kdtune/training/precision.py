"""Device and dtype names as configs spell them."""

import torch

from kdtune.errors import KDTuneError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str, key: str = "dtype") -> torch.dtype:
    if name not in _DTYPES:
        raise KDTuneError(f"{key}: unknown dtype '{name}'; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def resolve_device(name: str | None, key: str = "device") -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or None/'auto' (CUDA when available)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KDTuneError(f"{key}: unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDTuneError(f"{key}: '{name}' requested but CUDA is not available on this machine")
    return device


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
