"""Tiny Hugging Face configs covering every supported variant, and checkpoints made from them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdtune.checkpointing import write_random_checkpoint
from kdtune.checkpointing.hf_format import weight_files

_BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 160,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
    "initializer_range": 0.1,
}

CONFIGS = {
    # GQA, untied, plain RoPE
    "llama": dict(_BASE, model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    # tied, Llama 3.1 rope scaling (bands split across the 8 frequencies), attention and MLP biases
    "llama3_scaled": dict(
        _BASE,
        model_type="llama",
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        num_hidden_layers=3,
    ),
    # q/k/v bias, tied
    "qwen2": dict(_BASE, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    # q/k norm, head_dim (32) != hidden/heads (16), untied
    "qwen3": dict(
        _BASE,
        model_type="qwen3",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        head_dim=32,
        attention_bias=False,
        tie_word_embeddings=False,
    ),
    # sliding window 8 on every layer, head_dim given
    "mistral": dict(_BASE, model_type="mistral", rms_norm_eps=1e-5, rope_theta=1000000.0, head_dim=16,
                    sliding_window=8, tie_word_embeddings=False),
    # fused qkv_proj and gate_up_proj, sliding window 8, LongRoPE (short factors up to 32 positions)
    "phi3": dict(_BASE, model_type="phi3", rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0, sliding_window=8,
                 max_position_embeddings=128, original_max_position_embeddings=32, tie_word_embeddings=False,
                 rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                               "long_factor": [1.0 + 0.5 * i for i in range(8)]}),
    # GeGLU, sandwich norms, (1 + w) norms, embedding scale, query_pre_attn_scalar, attention and final
    # softcapping (low caps, so they bite), alternating sliding window 8, tied
    "gemma2": dict(_BASE, model_type="gemma2", pad_token_id=0, bos_token_id=2, eos_token_id=1, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                   rope_theta=10000.0, head_dim=32, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, sliding_window=8, num_hidden_layers=3, tie_word_embeddings=True,
                   initializer_range=0.3),
    # q/k norms, 5 local layers (window 8, base 10k) per global one (base 1M, linear scaling), no caps
    "gemma3_text": dict(_BASE, model_type="gemma3_text", pad_token_id=0, bos_token_id=2, eos_token_id=1, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                        head_dim=32, query_pre_attn_scalar=32, sliding_window=8, num_hidden_layers=7,
                        layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                            "rope_theta": 1000000.0}},
                        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True),
}


def make_checkpoint(name: str, out_dir: Path, *, max_shard_size=None, seed: int = 0, **changes) -> Path:
    """A random checkpoint of ``CONFIGS[name]`` (with ``changes``) whose norm weights are random too
    (not all ones), so a norm whose weight is ignored cannot go unnoticed."""
    write_random_checkpoint(dict(CONFIGS[name], **changes), out_dir, seed=seed, max_shard_size=max_shard_size)
    gen = torch.Generator().manual_seed(seed + 1)
    for path in weight_files(out_dir):
        tensors = {k: t.clone() for k, t in load_file(path).items()}  # no views of the file we rewrite
        for key, t in tensors.items():
            if key.endswith("norm.weight"):
                tensors[key] = t + 0.3 * torch.randn(t.shape, generator=gen)
        save_file(tensors, path, metadata={"format": "pt"})
    return out_dir


def qwen_tokenizer_config(**changes) -> dict:
    """A tiny Qwen2 config whose embedding covers the real Qwen2.5 tokenizer of tests/assets
    (151,936 rows like Qwen2.5-0.5B, more than the tokenizer's 151,665 ids)."""
    return {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True, **changes}
