"""Refusing, before any weight loads, a run whose models cannot fit: the least memory its weights,
gradients and optimizer state take (activations come on top and are not estimated), against what
the device has free. A plan that passes may still run out of memory; one that fails cannot run."""

from pathlib import Path

import torch

from kdtune.checkpointing import HFCheckpointer
from kdtune.errors import KDTuneError
from kdtune.models import TransformerDecoder
from kdtune.training.precision import resolve_dtype

_QUANTIZED_BYTES = {"nf4": 0.5, "int8": 1.0}  # per weight of the quantized linear layers
_STATES = {"adam": 2, "adamw": 2, "adamw_8bit": 0.5, "adamw_4bit": 0.25}  # optimizer moments per trained weight


def parameter_count(checkpointer: HFCheckpointer) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return sum(p.numel() for p in TransformerDecoder(checkpointer.model_args).parameters())


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: an accelerator's own, a CPU's MemAvailable (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory_plan(device: torch.device, dtype: torch.dtype, student: HFCheckpointer | None, model_node=None,
                      optimizer_node=None, teacher: HFCheckpointer | None = None, teacher_node=None,
                      processes: int = 1) -> None:
    """Refuse in one line when the student (trained in full or with LoRA) and the frozen teacher need
    more than ``device`` has free. With FSDP on accelerators each process holds its share; on a CPU
    the processes share one memory."""
    size = dtype.itemsize
    parts = {}
    if student is not None:
        n = parameter_count(student)
        lora = model_node is not None and "lora_rank" in model_node
        base = _QUANTIZED_BYTES["nf4"] if lora and model_node.get("quantize_base") else size
        optimizer = str((optimizer_node or {}).get("_component_", "")).rsplit(".", 1)[-1].lower()
        trained = 0 if lora else n  # LoRA's adapters are a rounding error at this bound
        parts["student"] = n * base + trained * size * (1 + _STATES.get(optimizer, 0))  # + gradients and moments
    if teacher is not None:
        teacher_node = teacher_node or {}
        teacher_size = resolve_dtype(teacher_node["dtype"], "teacher.dtype").itemsize if teacher_node.get("dtype") \
            else size
        parts["teacher"] = parameter_count(teacher) * _QUANTIZED_BYTES.get(teacher_node.get("quantize"), teacher_size)
    need = sum(parts.values()) / (processes if device.type == "cuda" else 1)
    free = free_bytes(device)
    if free is not None and need > free:
        each = ", ".join(f"{who} {b / 2**30:.1f}" for who, b in parts.items())
        raise KDTuneError(
            f"memory: this run needs at least {need / 2**30:.1f} GiB for weights, gradients and optimizer state "
            f"({each} GiB{' in all' if processes > 1 else ''}) but {device} has {free / 2**30:.1f} GiB free; train "
            f"with LoRA or QLoRA, quantize the teacher (teacher.quantize: nf4), use bf16, or shard over more devices")
