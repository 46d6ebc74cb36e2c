"""The Hugging Face checkpoint layout: ``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, tokenizer files; and native <-> HF tensor names."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdtune.errors import KDTuneError

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
OUTPUT_NAME = "lm_head.weight"
# Copied verbatim from the source checkpoint so the output loads in any HF-compatible tool.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (decimal) or ``"512MiB"`` (binary)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise KDTuneError(f"max_shard_size: cannot read {size!r} as a size (e.g. 5GB, 500MB, 1073741824)")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


def read_config(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / CONFIG
    if not path.is_file():
        raise KDTuneError(f"{path}: not found (is checkpoint_dir a Hugging Face checkpoint folder?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDTuneError(f"{path}: not valid JSON ({e})") from None


# Vision-language checkpoints whose text model kdtune reads (and writes as a text-only checkpoint):
# Gemma 3 from 4B up. Their text_config leaves out what equals transformers' defaults, given here.
VISION_LANGUAGE = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
}
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")  # as transformers 4 and 5 name them
_TEXT_HEADS = ("language_model.lm_head.weight", OUTPUT_NAME)


def text_config(config: dict) -> dict:
    """The config of the decoder kdtune runs: ``config`` itself, or for a vision-language checkpoint
    its ``text_config`` as a standalone text-only config (what the checkpoints kdtune writes hold)."""
    if config.get("model_type") not in VISION_LANGUAGE:
        return config
    model_type, architecture = VISION_LANGUAGE[config["model_type"]]
    text = {**_GEMMA3_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    text.update(model_type=model_type, architectures=[architecture],
                tie_word_embeddings=config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    for key in ("torch_dtype", "dtype"):
        if key in config:
            text.setdefault(key, config[key])
    return text


def to_native(hf_name: str, vision_language: bool = False) -> str | None:
    """The native name of a checkpoint tensor; None for the vision tower and projector of a
    vision-language checkpoint, which kdtune leaves out."""
    if vision_language:
        if hf_name in _TEXT_HEADS:
            return OUTPUT_NAME
        prefix = next((p for p in _TEXT_PREFIXES if hf_name.startswith(p)), None)
        return None if prefix is None else hf_name[len(prefix):]
    return hf_name if hf_name == OUTPUT_NAME else hf_name.removeprefix("model.")


def to_hf(native_name: str) -> str:
    return native_name if native_name == OUTPUT_NAME else f"model.{native_name}"


def weight_files(checkpoint_dir: Path) -> dict[Path, set[str] | None]:
    """Each weight file -> the HF names the index says it holds (None for a single unindexed file)."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise KDTuneError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(checkpoint_dir / file, set()).add(name)
        for path in files:
            if not path.is_file():
                raise KDTuneError(f"{path}: named in {index.name} but missing")
        return files
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise KDTuneError(f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX} (only safetensors checkpoints are read)")


def iter_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) file by file. Tensors are memory-mapped views of the files, so reading
    costs no memory until a tensor is touched, and a file's pages go once its tensors are dropped."""
    for path, expected in weight_files(checkpoint_dir).items():
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if expected is not None and not expected <= names:
                    missing = sorted(expected - names)[0]
                    raise KDTuneError(f"{path}: the index places {missing!r} here but the file lacks it")
                for name in sorted(names):
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise KDTuneError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Split names (in order) into consecutive groups of at most ``max_bytes``; a tensor larger
    than that gets a group of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_weights(
    out_dir: Path, sizes: dict[str, int], get_tensor: Callable[[str], torch.Tensor], max_shard_size: int | str
) -> None:
    """Write HF-named tensors as ``model.safetensors``, or as shards plus an index when they exceed
    ``max_shard_size``. ``sizes`` fixes order and byte counts up front so shard names are known
    before any is written; ``get_tensor`` produces one tensor at a time, so only one shard's worth
    is ever held in memory for writing."""
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    for file, shard in zip(names, shards):
        tensors = {name: get_tensor(name).detach().to("cpu").contiguous() for name in shard}
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: file for file, shard in zip(names, shards) for name in shard},
        }
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling of ``config.json``'s ``torch_dtype``."""
    return str(dtype).removeprefix("torch.")


def with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """The config with its dtype entry (``torch_dtype``, and ``dtype`` where newer tools wrote it)
    set to ``dtype``."""
    config = dict(config, torch_dtype=dtype_name(dtype))
    if "dtype" in config:
        config["dtype"] = dtype_name(dtype)
    return config
