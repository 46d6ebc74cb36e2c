"""The native decoder (Llama 3, Qwen2/2.5, Qwen3), its architecture read from ``config.json``,
and named builders for the published sizes. Loading from a checkpoint folder lives in
``kdtune.checkpointing`` (``load_model``, ``HFCheckpointer``)."""

from kdtune.models.args import ModelArgs
from kdtune.models.decoder import TransformerDecoder
from kdtune.models.builders import (
    llama3_1_8b,
    llama3_2_1b,
    llama3_2_3b,
    qwen2_0_5b,
    qwen2_1_5b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_7b,
    qwen3_0_6b,
    qwen3_1_7b,
)

__all__ = [
    "ModelArgs",
    "TransformerDecoder",
    "llama3_1_8b",
    "llama3_2_1b",
    "llama3_2_3b",
    "qwen2_0_5b",
    "qwen2_1_5b",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen3_0_6b",
    "qwen3_1_7b",
]
