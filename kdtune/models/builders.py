"""Named model sizes with their published dimensions, for building without a checkpoint.

Each builder returns a randomly initialised ``TransformerDecoder`` (build under
``torch.device("meta")`` to skip the allocation); ``HFCheckpointer.load_model(model)`` then checks
it against the checkpoint's ``config.json`` and fills it. ``options`` go to the decoder
(``num_output_chunks``, ``activation_checkpointing``).
"""

from __future__ import annotations

from kdtune.models.args import ModelArgs
from kdtune.models.decoder import TransformerDecoder

_LLAMA3_1_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_2_SCALING = dict(_LLAMA3_1_SCALING, factor=32.0)


def _qwen2(hidden, intermediate, layers, heads, kv_heads, *, vocab=151936, tied=True, max_pos=32768) -> ModelArgs:
    return ModelArgs(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        qkv_bias=True,
        max_position_embeddings=max_pos,
    )


def _qwen3(hidden, intermediate, layers) -> ModelArgs:
    return ModelArgs(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qk_norm=True,
        max_position_embeddings=40960,
    )


def _llama3(hidden, intermediate, layers, heads, *, tied, scaling) -> ModelArgs:
    return ModelArgs(
        model_type="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=hidden // heads,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=scaling,
        tie_word_embeddings=tied,
        max_position_embeddings=131072,
    )


PUBLISHED: dict[str, ModelArgs] = {
    "qwen2_0_5b": _qwen2(896, 4864, 24, 14, 2, max_pos=131072),
    "qwen2_1_5b": _qwen2(1536, 8960, 28, 12, 2, max_pos=131072),
    "qwen2_5_0_5b": _qwen2(896, 4864, 24, 14, 2),
    "qwen2_5_1_5b": _qwen2(1536, 8960, 28, 12, 2, max_pos=131072),
    "qwen2_5_7b": _qwen2(3584, 18944, 28, 28, 4, vocab=152064, tied=False, max_pos=131072),
    "qwen3_0_6b": _qwen3(1024, 3072, 28),
    "qwen3_1_7b": _qwen3(2048, 6144, 28),
    "llama3_2_1b": _llama3(2048, 8192, 16, 32, tied=True, scaling=_LLAMA3_2_SCALING),
    "llama3_2_3b": _llama3(3072, 8192, 28, 24, tied=True, scaling=_LLAMA3_2_SCALING),
    "llama3_1_8b": _llama3(4096, 14336, 32, 32, tied=False, scaling=_LLAMA3_1_SCALING),
}


def qwen2_0_5b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen2_0_5b"], **options)


def qwen2_1_5b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen2_1_5b"], **options)


def qwen2_5_0_5b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen2_5_0_5b"], **options)


def qwen2_5_1_5b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen2_5_1_5b"], **options)


def qwen2_5_7b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen2_5_7b"], **options)


def qwen3_0_6b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen3_0_6b"], **options)


def qwen3_1_7b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["qwen3_1_7b"], **options)


def llama3_2_1b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["llama3_2_1b"], **options)


def llama3_2_3b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["llama3_2_3b"], **options)


def llama3_1_8b(**options) -> TransformerDecoder:
    return TransformerDecoder(PUBLISHED["llama3_1_8b"], **options)
