"""The decoder's architecture, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdtune.errors import KDTuneError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# Fields that change the computation; a builder and a checkpoint must agree on all of them.
# (max_position_embeddings is informational: positions are not bounded by it.)
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "qk_norm",
)


@dataclass(frozen=True)
class ModelArgs:
    """Everything the decoder needs to know, independent of which family spelled it how."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 131072

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        """Translate a ``config.json`` dict; ``source`` names the file in error messages."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KDTuneError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key):
            if key not in cfg:
                raise KDTuneError(f"{source}: missing required key {key!r}")
            return cfg[key]

        if cfg.get("hidden_act", "silu") != "silu":
            raise KDTuneError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (only 'silu')")
        if cfg.get("use_sliding_window"):
            raise KDTuneError(f"{source}: use_sliding_window=true is not supported")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        attention_bias = bool(cfg.get("attention_bias", False))
        theta, scaling = _rope(cfg, source)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (its config has no switch); Llama and Qwen3 follow attention_bias.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
        )

    def check_matches(self, other: ModelArgs, source: str) -> None:
        """Raise naming the first architecture field where ``other`` (read from ``source``) differs."""
        for field in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise KDTuneError(f"{source}: {field} is {theirs!r} but the model builder expects {mine!r}")

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)


def _rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from either the classic ``rope_theta``/``rope_scaling`` keys
    or the ``rope_parameters`` dict newer transformers versions write."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise KDTuneError(f"{source}: unsupported rope scaling type {kind!r} (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise KDTuneError(f"{source}: llama3 rope scaling is missing {', '.join(missing)}")
    return theta, {k: params[k] for k in keys}
