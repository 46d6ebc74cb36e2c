"""Loading the student (full, LoRA or QLoRA) and the frozen teacher, and saving the student.

A config's ``model`` node holds only what ``config.json`` does not say: LoRA settings,
activation checkpointing, and optionally a named builder (``_component_: qwen2_0_5b``) that the
checkpoint must match. The teacher's node may keep it in bf16 or quantize its linear layers.
"""

import inspect
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from kdtune.checkpointing import ADAPTER_SUBDIR, HFCheckpointer, load_peft_adapter, save_peft_adapter
from kdtune.config import instantiate
from kdtune.config.checks import boolean
from kdtune.errors import KDTuneError
from kdtune.models import TransformerDecoder
from kdtune.modules.lora import apply_lora, check_lora_args, lora_modules, merge_lora_state_dict, quantize_nf4
from kdtune.training.precision import resolve_dtype

LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
             "lora_dropout", "quantize_base")
_MODEL_KEYS = {"_component_", "activation_checkpointing", *LORA_KEYS}
_TEACHER_KEYS = {"_component_", "dtype", "quantize"}


def _options(node, allowed: set[str], key: str) -> dict:
    opts = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise KDTuneError(f"{key}: unknown option '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
    return opts


def _builder_model(opts: dict, key: str):
    """The named builder's model on the meta device, for checking against ``config.json``."""
    if "_component_" not in opts:
        return None
    with torch.device("meta"):
        return instantiate(OmegaConf.create({"_component_": opts["_component_"]}), _where=key)


def is_lora(model_node) -> bool:
    """Whether a ``model`` node asks for LoRA adapters: it sets ``lora_rank`` (another LoRA option
    alone is refused by `check_lora_options`, never a silent switch to LoRA)."""
    return model_node is not None and "lora_rank" in model_node


def check_lora_options(model_node) -> None:
    """A LoRA option without ``lora_rank`` is refused: it would otherwise switch a full run to LoRA."""
    opts = model_node or {}
    stray = [k for k in LORA_KEYS if k != "lora_rank" and k in opts]
    if stray and not is_lora(model_node):
        raise KDTuneError(f"model.{stray[0]}: a LoRA option, but model.lora_rank is not set; set lora_rank to "
                          f"train LoRA adapters, or remove {stray[0]} to train every weight")
    if is_lora(model_node):  # the adapters' ranges, before anything loads
        defaults = {name: p.default for name, p in inspect.signature(apply_lora).parameters.items()}
        args = {k: opts.get(k, defaults[k]) for k in ("lora_attn_modules", "lora_rank", "lora_alpha", "lora_dropout")}
        try:
            check_lora_args(**args)
        except KDTuneError as e:
            raise KDTuneError(f"model.{e}") from None
        for key in ("apply_lora_to_mlp", "apply_lora_to_output", "quantize_base"):
            if key in opts:
                boolean()(f"model.{key}", opts[key])


def describe_trainable(model: nn.Module) -> str:
    """One line saying what trains: trainable and total parameter counts, and the LoRA targets."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapters = lora_modules(model)
    if adapters:
        targets = sorted({name.rsplit(".", 1)[-1] for name in adapters})
        ranks = sorted({m.rank for m in adapters.values()})
        what = f"LoRA rank {'/'.join(map(str, ranks))} on {', '.join(targets)} ({len(adapters)} projections)"
    else:
        what = "every weight (full fine-tuning)"
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%): {what}"


def load_student(checkpointer: HFCheckpointer, model_node, *, device, dtype, resume_dir: Path | None = None) -> nn.Module:
    """The trainable student. A full model resumes from the step folder's weights; a LoRA model
    reloads its base from the original checkpoint and its adapter from the step folder."""
    opts = _options(model_node, _MODEL_KEYS, "model")
    check_lora_options(opts)
    lora = {k: opts[k] for k in LORA_KEYS if k in opts}
    source = checkpointer if resume_dir is None or lora else HFCheckpointer(resume_dir)
    if lora:  # the adapters must fit the layers: checked on a model without memory, before any weight loads
        with torch.device("meta"):
            apply_lora(TransformerDecoder(source.model_args), **{**lora, "quantize_base": False})
    model = source.load_model(_builder_model(opts, "model"), dtype=dtype, device=device)
    if lora:
        apply_lora(model, **lora)
        if resume_dir is not None:
            load_peft_adapter(model, resume_dir)
    model.enable_activation_checkpointing(bool(opts.get("activation_checkpointing", False)))
    return model


def load_teacher(checkpointer: HFCheckpointer, teacher_node, *, device, dtype) -> nn.Module:
    """The frozen teacher: eval mode, no gradients; ``dtype`` may differ from the student's and
    ``quantize: nf4 | int8`` stores its decoder-layer weights in low precision (torchao)."""
    opts = _options(teacher_node, _TEACHER_KEYS, "teacher")
    if "dtype" in opts:
        dtype = resolve_dtype(opts["dtype"], "teacher.dtype")
    model = checkpointer.load_model(_builder_model(opts, "teacher"), dtype=dtype, device=device)
    model.requires_grad_(False)
    model.eval()
    quantize = opts.get("quantize")
    if quantize not in (None, "nf4", "int8"):
        raise KDTuneError(f"teacher.quantize: expected null, nf4 or int8, got '{quantize}'")
    if quantize:
        _quantize_layers(model, quantize)
    return model


def _quantize_layers(model: nn.Module, scheme: str) -> None:
    # Only the decoder layers: the output projection stays in full precision because the fused
    # losses multiply with it directly.
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model.layers, Int8WeightOnlyConfig())
        return
    for module in model.layers.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(quantize_nf4(module.weight), requires_grad=False)


def student_saver(checkpointer: HFCheckpointer, model: nn.Module):
    """``save(recipe_state=..., step=N | epoch=N, write_extra=None)`` writing HF weights (merged for
    LoRA), for LoRA the PEFT adapter in ``adapter/``, and whatever ``write_extra(folder)`` adds.
    Returns the folder's path."""
    base = str(checkpointer.checkpoint_dir)
    lora = bool(lora_modules(model))

    def extra(folder: Path, write_extra) -> None:
        if lora:
            save_peft_adapter(model, folder / ADAPTER_SUBDIR, base_model_name_or_path=base)
        if write_extra is not None:
            write_extra(folder)

    def save(*, recipe_state: dict, write_extra=None, **step_or_epoch) -> Path:
        weights = merge_lora_state_dict(model) if lora else model.state_dict()
        return checkpointer.save(weights, recipe_state=recipe_state, **step_or_epoch,
                                 write_extra=lambda folder: extra(folder, write_extra))

    return save
