"""Datasets: rows from files or the hub, rendered in the model's chat format, tokenized, packed, batched.

Namespaced as ``kdtune.datasets`` on purpose: a top-level ``datasets`` package would shadow the
library lm-eval imports.
"""

from kdtune.datasets.alpaca import alpaca_dataset
from kdtune.datasets.arithmetic import arithmetic_dataset, arithmetic_rows, write_arithmetic_jsonl
from kdtune.datasets.instructions import instruction_prompts, write_instruction_jsonl
from kdtune.datasets.chat import chat_dataset
from kdtune.datasets.collate import collate, collate_prompts
from kdtune.datasets.prompts import PromptDataset, prompt_completion_sample, prompt_dataset
from kdtune.datasets.sft import IGNORE_INDEX, SFTDataset
from kdtune.datasets.text_completion import text_completion_dataset

__all__ = [
    "IGNORE_INDEX",
    "PromptDataset",
    "SFTDataset",
    "alpaca_dataset",
    "arithmetic_dataset",
    "arithmetic_rows",
    "instruction_prompts",
    "chat_dataset",
    "collate",
    "collate_prompts",
    "prompt_completion_sample",
    "prompt_dataset",
    "text_completion_dataset",
    "write_arithmetic_jsonl",
    "write_instruction_jsonl",
]
