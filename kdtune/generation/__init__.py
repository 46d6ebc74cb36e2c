"""Batched sampling from the native decoder with a KV cache, for on-policy distillation, the
``generate`` recipe and evaluation."""

from kdtune.generation.generate import GenerationOutput, generate
from kdtune.generation.masks import padded_attention_mask, padded_positions
from kdtune.generation.sampling import filter_logits, first_argmax, sample_next

__all__ = ["GenerationOutput", "filter_logits", "first_argmax", "generate", "padded_attention_mask", "padded_positions", "sample_next"]
