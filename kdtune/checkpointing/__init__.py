"""Checkpoints in Hugging Face format: load and save (sharded safetensors, atomic step folders),
recipe state for resuming, random-weight checkpoints, the teacher/student vocabulary check, and
PEFT adapters (``peft.py``)."""

from kdtune.checkpointing.hf_checkpointer import HFCheckpointer, write_checkpoint
from kdtune.checkpointing.loading import load_model
from kdtune.checkpointing.peft import ADAPTER_SUBDIR, load_peft_adapter, save_peft_adapter
from kdtune.checkpointing.random_init import write_random_checkpoint
from kdtune.checkpointing.recipe_state import latest_checkpoint, load_recipe_state, save_recipe_state
from kdtune.checkpointing.vocab import (
    VOCAB_CHECKS, check_same_tokens, check_vocab_compatible, require_comparable, scored_vocab_size,
)

__all__ = [
    "ADAPTER_SUBDIR",
    "HFCheckpointer",
    "VOCAB_CHECKS",
    "check_same_tokens",
    "require_comparable",
    "check_vocab_compatible",
    "scored_vocab_size",
    "latest_checkpoint",
    "load_model",
    "load_peft_adapter",
    "load_recipe_state",
    "save_peft_adapter",
    "save_recipe_state",
    "write_checkpoint",
    "write_random_checkpoint",
]
