"""Random-weight Hugging Face checkpoints from a config dict: for tests, benchmarks and
pretraining small models from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdtune.checkpointing.hf_format import CONFIG, to_hf, with_dtype, write_weights
from kdtune.models.args import ModelArgs
from kdtune.models.decoder import TransformerDecoder

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}


def write_random_checkpoint(
    hf_config: dict,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``config.json`` + safetensors for the model ``hf_config`` describes and return ``out_dir``.

    Norm weights are the identity (1, or 0 where the norm scales by 1 + weight); every other tensor
    (biases included) is drawn from N(0, initializer_range),
    default 0.02, with a generator seeded by ``seed``, one tensor at a time in float32, so a
    billion-parameter checkpoint needs only one shard's worth of memory. ``max_shard_size`` None
    writes a single ``model.safetensors``.
    """
    out_dir = Path(out_dir)
    args = ModelArgs.from_hf_config(hf_config, source="hf_config")
    with torch.device("meta"):
        shapes = {to_hf(name): t.shape for name, t in TransformerDecoder(args).state_dict().items()}
    std = hf_config.get("initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)

    def make(hf_name: str) -> torch.Tensor:
        if hf_name.endswith("norm.weight"):
            return torch.full(shapes[hf_name], 0.0 if args.norm_unit_offset else 1.0, dtype=dtype)
        return torch.empty(shapes[hf_name]).normal_(0.0, std, generator=generator).to(dtype)

    element = torch.empty((), dtype=dtype).element_size()
    sizes = {name: shape.numel() * element for name, shape in shapes.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config = with_dtype(hf_config, dtype)
    config.setdefault("architectures", [_ARCHITECTURES[args.model_type]])
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_weights(out_dir, sizes, make, max_shard_size or sum(sizes.values()))
    return out_dir
