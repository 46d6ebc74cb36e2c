"""LoRA adapters in PEFT's on-disk format, so ``peft.PeftModel.from_pretrained`` loads them onto the
Hugging Face base model and kdtune loads them back onto a native one.

An adapter folder holds ``adapter_model.safetensors`` (keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) and ``adapter_config.json``.
Writers put files into the folder they are given; making the write atomic (a temporary step
folder renamed when complete) is the caller's job.

In a step folder that also holds merged full weights, the adapter goes into the ``adapter/``
subfolder (``ADAPTER_SUBDIR``): transformers' ``from_pretrained`` applies an adapter it finds next
to ``config.json`` on top of the weights there, which would add the update twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdtune.checkpointing.hf_format import to_hf
from kdtune.errors import KDTuneError
from kdtune.modules.lora import (
    ATTN_MODULES,
    FUSED_MLP_MODULES,
    FUSED_QKV,
    MLP_MODULES,
    OUTPUT_MODULE,
    apply_lora,
    lora_modules,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SUBDIR = "adapter"
_PREFIX = "base_model.model."


def _hf_module_name(name: str) -> str:
    return to_hf(f"{name}.weight").removesuffix(".weight")


def _peft_keys(model: nn.Module, *, with_base: bool = False) -> dict[str, torch.Tensor]:
    """PEFT key -> the model's tensor it names: the adapters, and with ``with_base`` the frozen base
    weights too, which PEFT saves next to the adapters when it adapts an output layer."""
    keys = {}
    for name, module in lora_modules(model).items():
        prefix = f"{_PREFIX}{_hf_module_name(name)}"
        keys[f"{prefix}.lora_A.weight"] = module.lora_a.weight
        keys[f"{prefix}.lora_B.weight"] = module.lora_b.weight
        if with_base:
            keys[f"{prefix}.base_layer.weight"] = module.weight
            if module.bias is not None:
                keys[f"{prefix}.base_layer.bias"] = module.bias
    return keys


def _lora_hyperparameters(model: nn.Module) -> tuple[int, float, float]:
    """The (rank, alpha, dropout) every LoRA layer of the model shares."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call apply_lora first")
    settings = {(m.rank, m.alpha, getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers disagree on (rank, alpha, dropout): {sorted(settings)}")
    return settings.pop()


def save_peft_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> None:
    """Write the model's adapters as ``adapter_model.safetensors`` + ``adapter_config.json``.

    Rank, alpha, dropout and the target modules are read off the model's LoRA layers, so the
    config cannot disagree with the weights.
    """
    rank, alpha, dropout = _lora_hyperparameters(model)
    targets = sorted({name.rpartition(".")[2] for name in lora_modules(model)})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: w.detach().to("cpu").contiguous() for key, w in _peft_keys(model).items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# adapter_config.json settings that change the math or the layout; anything else than these
# values is a PEFT feature kdtune's LoRALinear does not have.
_REQUIRED = {
    "peft_type": ("LORA",),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "use_rslora": (False, None),
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
}


def find_adapter_dir(path: str | Path) -> Path:
    """``path`` itself when it holds ``adapter_config.json``, else its ``adapter/`` subfolder when
    that does (a step folder); otherwise ``path``, so the error names what was asked for."""
    path = Path(path)
    nested = path / ADAPTER_SUBDIR
    return nested if not (path / ADAPTER_CONFIG).is_file() and (nested / ADAPTER_CONFIG).is_file() else path


def read_peft_config(adapter_dir: str | Path) -> dict:
    """Parse and check ``adapter_config.json``: KDTuneError names the file and the unsupported key."""
    path = find_adapter_dir(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise KDTuneError(f"{path}: not found; a PEFT adapter folder needs {ADAPTER_CONFIG}") from None
    except json.JSONDecodeError as e:
        raise KDTuneError(f"{path}: not valid JSON ({e})") from None
    for key, allowed in _REQUIRED.items():
        if config.get(key, allowed[-1]) not in allowed:
            raise KDTuneError(f"{path}: {key} = {config[key]!r} is not supported (kdtune reads {allowed[0]!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise KDTuneError(f"{path}: missing {key!r}")
    targets = config["target_modules"]
    allowed = set(ATTN_MODULES) | set(MLP_MODULES) | set(FUSED_MLP_MODULES) | {FUSED_QKV, OUTPUT_MODULE}
    if not isinstance(targets, list) or not set(targets) <= allowed:
        raise KDTuneError(f"{path}: target_modules = {targets!r} must be a list drawn from {sorted(allowed)}")
    mlp = set(targets) & (set(MLP_MODULES) | set(FUSED_MLP_MODULES))
    if mlp and mlp not in (set(MLP_MODULES), set(FUSED_MLP_MODULES)):
        raise KDTuneError(
            f"{path}: target_modules = {targets!r} adapts part of the MLP; "
            f"kdtune adapts all of {list(MLP_MODULES)} (Phi-3: {list(FUSED_MLP_MODULES)}) or none"
        )
    return config


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, *, quantize_base: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter (an adapter folder, or a step folder with one) into a native model.

    A model without LoRA layers gets them first, as ``adapter_config.json`` describes (with NF4
    bases when ``quantize_base``); a model that has them must match the adapter exactly. Base
    weights PEFT stored with the adapter (``*.base_layer.weight``) replace the model's, as in PEFT.
    """
    config = read_peft_config(adapter_dir)
    targets = config["target_modules"]
    if not lora_modules(model):
        attn = [m for m in ATTN_MODULES if m in targets or (FUSED_QKV in targets and m != "o_proj")]
        apply_lora(
            model,
            lora_attn_modules=attn,
            apply_lora_to_mlp="down_proj" in targets,
            apply_lora_to_output=OUTPUT_MODULE in targets,
            lora_rank=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config.get("lora_dropout", 0.0),
            quantize_base=quantize_base,
        )
    path = find_adapter_dir(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError) as e:
        raise KDTuneError(f"{path}: cannot read the adapter weights ({e})") from None
    adapters, known = _peft_keys(model), _peft_keys(model, with_base=True)
    missing, unexpected = sorted(set(adapters) - set(tensors)), sorted(set(tensors) - set(known))
    if missing or unexpected:
        raise KDTuneError(
            f"{path}: adapter keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    alphas = {m.alpha for m in lora_modules(model).values()}
    if alphas != {config["lora_alpha"]}:
        raise KDTuneError(
            f"{path.parent / ADAPTER_CONFIG}: lora_alpha = {config['lora_alpha']!r}, "
            f"the model's LoRA layers use {sorted(alphas)}"
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            if tensor.shape != known[key].shape:
                raise KDTuneError(
                    f"{path}: {key} has shape {list(tensor.shape)}, the model expects {list(known[key].shape)}"
                )
            known[key].copy_(tensor)  # an NF4 base re-quantizes what it is given
    return model
