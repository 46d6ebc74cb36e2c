"""Load a Hugging Face checkpoint into the native decoder and save it back in the same format."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kdtune.checkpointing.atomic import atomic_directory
from kdtune.checkpointing.hf_format import (
    CONFIG,
    TOKENIZER_FILES,
    iter_tensors,
    read_config,
    text_config,
    to_hf,
    to_native,
    with_dtype,
    write_weights,
)
from kdtune.checkpointing.model_card import write_model_card
from kdtune.checkpointing.recipe_state import save_recipe_state
from kdtune.errors import KDTuneError
from kdtune.models.args import ModelArgs
from kdtune.models.decoder import TransformerDecoder


class HFCheckpointer:
    """Reads ``checkpoint_dir`` (``config.json`` + safetensors) and writes ``output_dir/step_N``.

    ``config.json`` is read (and checked) on construction, so a wrong ``checkpoint_dir`` fails
    before any training or writing starts. Of a vision-language checkpoint (Gemma 3 4B and up) the
    text model is read, and saved as a text-only checkpoint (``Gemma3ForCausalLM``).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        output_dir: str | Path | None = None,
        *,
        max_shard_size: int | str = "5GB",
    ):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.max_shard_size = max_shard_size
        source = read_config(self.checkpoint_dir)
        self.config = text_config(source)
        self.vision_language = self.config is not source
        self.model_args = ModelArgs.from_hf_config(self.config, source=str(self.checkpoint_dir / CONFIG))

    def load(self, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> dict:
        """The native state dict, streamed file by file.

        Tensors already in ``dtype`` on CPU stay memory-mapped views of the files (copy-on-write),
        so peak memory stays near one copy of the weights; others are converted one at a time.
        A tied checkpoint's redundant ``lm_head.weight``, when present, is skipped.
        """
        tied = self.model_args.tie_word_embeddings
        state = {}
        for hf_name, tensor in iter_tensors(self.checkpoint_dir):
            name = to_native(hf_name, self.vision_language)
            if name is None or (tied and name == "lm_head.weight"):
                continue
            state[name] = tensor.to(device=device, dtype=dtype)
        return state

    def load_model(
        self,
        model: TransformerDecoder | None = None,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        **options,
    ) -> TransformerDecoder:
        """The checkpoint's model with its weights, in training mode.

        ``model`` (e.g. a named builder's, best built under ``torch.device("meta")``) is checked
        against ``config.json`` and filled; without it one is built from ``config.json`` with
        ``options`` (``num_output_chunks``, ``activation_checkpointing``). Weights are assigned,
        not copied, so no second copy is ever allocated.
        """
        if model is None:
            with torch.device("meta"):
                model = TransformerDecoder(self.model_args, **options)
        else:
            model.args.check_matches(self.model_args, str(self.checkpoint_dir / CONFIG))
        state = self.load(dtype=dtype, device=device)
        _check_state_dict(model, state, self.checkpoint_dir)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save(
        self,
        state_dict: dict[str, torch.Tensor],
        *,
        step: int | None = None,
        epoch: int | None = None,
        recipe_state: dict | None = None,
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write ``output_dir/step_N`` (or ``epoch_N``) atomically and return its path.

        The folder gets ``config.json`` (the source's, ``torch_dtype`` set to the weights' dtype),
        the weights under HF names in shards of at most ``max_shard_size``, the source's tokenizer
        and generation-config files, ``recipe_state.pt`` when ``recipe_state`` is given, and
        whatever ``write_extra(folder)`` writes (e.g. a PEFT adapter). It appears complete or not
        at all; an existing folder of that name is an error, never overwritten.
        """
        if self.output_dir is None:
            raise ValueError("HFCheckpointer was created without an output_dir")
        if (step is None) == (epoch is None):
            raise ValueError("pass exactly one of step= or epoch=")
        final = self.output_dir / (f"step_{step}" if step is not None else f"epoch_{epoch}")
        return write_checkpoint(final, self.config, state_dict, source_dir=self.checkpoint_dir,
                                max_shard_size=self.max_shard_size, recipe_state=recipe_state, write_extra=write_extra,
                                run_dir=self.output_dir)


def write_checkpoint(final: Path, config: dict, state_dict: dict[str, torch.Tensor], *, source_dir: Path,
                     max_shard_size: int | str = "5GB", recipe_state: dict | None = None,
                     write_extra: Callable[[Path], None] | None = None, run_dir: Path | None = None) -> Path:
    """Write the folder ``final`` atomically: ``config`` (``torch_dtype`` set to the weights'),
    the native ``state_dict`` under HF names in shards of at most ``max_shard_size``, the tokenizer
    and generation-config files of ``source_dir``, a model card (``README.md``, from the records of
    the run in ``run_dir`` when given), ``recipe_state.pt`` when given, and whatever
    ``write_extra(folder)`` adds. An existing folder of that name is an error, never overwritten."""
    floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    sizes = {to_hf(name): t.numel() * t.element_size() for name, t in state_dict.items()}
    hf_to_native = {to_hf(name): name for name in state_dict}
    with atomic_directory(final) as tmp:
        config = with_dtype(config, floats[0]) if floats else config
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_weights(tmp, sizes, lambda hf_name: state_dict[hf_to_native[hf_name]], max_shard_size)
        for file in TOKENIZER_FILES:
            if (Path(source_dir) / file).is_file():
                shutil.copy2(Path(source_dir) / file, tmp / file)
        write_model_card(tmp, final_name=final.name, run_dir=run_dir, source_dir=Path(source_dir), source_config=config)
        if recipe_state is not None:
            save_recipe_state(tmp, recipe_state)
        if write_extra is not None:
            write_extra(tmp)
    return final


def _check_state_dict(model: nn.Module, state: dict, checkpoint_dir: Path) -> None:
    """Checkpoint tensors vs the model config.json describes: a mismatch is a broken checkpoint."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        what = f"missing {to_hf(missing[0])!r}" if missing else f"unexpected {to_hf(unexpected[0])!r}"
        raise KDTuneError(
            f"{checkpoint_dir}: weights do not match config.json: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise KDTuneError(
                f"{checkpoint_dir}: {to_hf(name)!r} has shape {tuple(state[name].shape)}, "
                f"config.json implies {tuple(shape)}"
            )
