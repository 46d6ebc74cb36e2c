"""The decoder's architecture, read from a Hugging Face ``config.json``.

One set of fields serves every family: Llama 3, Qwen2/2.5/3, Mistral and Phi-3 are pre-norm SwiGLU
decoders that differ in biases, norms on q/k, fused projections and sliding windows; Gemma 2 and 3
add an embedding scale, (1 + weight) norms, GeGLU, norms after attention and MLP, their own attention
scale, logit softcapping and per-layer local/global attention with its own RoPE base.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kdtune.errors import KDTuneError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
FULL, SLIDING = "full_attention", "sliding_attention"

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
    "hidden_act",
    "norm_unit_offset",
    "embed_scale",
    "sandwich_norms",
    "attn_scale",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
    "layer_types",
    "local_rope_theta",
    "local_rope_scaling",
    "fused_projections",
)

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class ModelArgs:
    """Everything the decoder needs to know, independent of which family spelled it how.

    ``layer_types`` gives each layer ``full_attention`` or ``sliding_attention`` (attending to the
    last ``sliding_window`` positions, itself included); None means all full. Sliding layers use
    ``local_rope_theta``/``local_rope_scaling`` when set (Gemma 3), else the global RoPE.
    """

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
    hidden_act: str = "silu"  # the MLP's gate activation: SwiGLU, or GeGLU with tanh-approximate GELU
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), in float32
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma: norms on the attention and MLP outputs too
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj, as its checkpoints store them

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        """Translate a ``config.json`` dict; ``source`` names the file in error messages."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KDTuneError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key):
            if cfg.get(key) is None:
                raise KDTuneError(f"{source}: missing required key {key!r}")
            return cfg[key]

        _refuse_unimplemented(cfg, model_type, source)
        gemma = model_type in GEMMA
        # Gemma's MLP reads hidden_activation (its configs may carry a hidden_act it ignores)
        act = cfg.get("hidden_activation") or "gelu_pytorch_tanh" if gemma else cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise KDTuneError(f"{source}: unsupported hidden_act {act!r} (supported: {', '.join(ACTIVATIONS)})")
        _check_consistent(cfg, source, gemma)
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        layers = need("num_hidden_layers")
        head_dim = cfg.get("head_dim", 256 if gemma else None) or hidden // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        rope, local_rope = _rope(cfg, model_type, source)
        window, layer_types = _attention_pattern(cfg, model_type, layers, source)
        # Absent keys take transformers' defaults for the family, so both read a config alike.
        defaults = _GEMMA_DEFAULTS.get(model_type, {})
        caps = {key: _positive(cfg, key, source, defaults.get(key))
                for key in ("attn_logit_softcapping", "final_logit_softcapping")}
        scalar = cfg.get("query_pre_attn_scalar", 256) if gemma else None
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5 if model_type == "phi3" else 1e-6)),
            rope_theta=rope[0],
            rope_scaling=rope[1],
            # Gemma ties its output layer unless it says otherwise (transformers' default there).
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            # Qwen2 always has q/k/v bias (its config has no switch); Llama and Qwen3 follow attention_bias.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            hidden_act=act,
            norm_unit_offset=gemma,
            embed_scale=math.sqrt(hidden) if gemma else None,
            sandwich_norms=gemma,
            attn_scale=None if scalar is None else float(scalar) ** -0.5,
            attn_logit_softcapping=caps["attn_logit_softcapping"],
            final_logit_softcapping=caps["final_logit_softcapping"],
            sliding_window=window,
            layer_types=layer_types,
            local_rope_theta=None if local_rope is None else local_rope[0],
            local_rope_scaling=None if local_rope is None else local_rope[1],
            fused_projections=model_type == "phi3",
        )

    def check_matches(self, other: ModelArgs, source: str) -> None:
        """Raise naming the first architecture field where ``other`` (read from ``source``) differs."""
        for field in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise KDTuneError(f"{source}: {field} is {theirs!r} but the model builder expects {mine!r}")

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)


_GEMMA_DEFAULTS = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}}


def _positive(cfg: dict, key: str, source: str, default: float | None = None) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise KDTuneError(f"{source}: {key} must be a positive number or null, got {value!r}")
    return float(value)


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def _check_consistent(cfg: dict, source: str, gemma: bool) -> None:
    """The fields the decoder's shapes come from, checked against each other before any weight loads:
    one line naming the field that contradicts the others."""
    for key in _SIZES:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KDTuneError(f"{source}: {key} must be a positive integer, got {value!r}")
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise KDTuneError(f"{source}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads} "
                          f"(each key/value head serves a whole group of query heads)")
    head_dim = cfg.get("head_dim", 256 if gemma else None)
    if head_dim is None and heads and cfg.get("hidden_size") and cfg["hidden_size"] % heads:
        raise KDTuneError(f"{source}: hidden_size={cfg['hidden_size']} is not a multiple of num_attention_heads="
                          f"{heads}, and no head_dim says how wide a head is")
    width = head_dim or (cfg.get("hidden_size") or 0) // (heads or 1)
    if width % 2:
        raise KDTuneError(f"{source}: head_dim={width} is odd; rotary embeddings rotate pairs of channels")
    for key in ("rms_norm_eps", "rope_theta"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise KDTuneError(f"{source}: {key} must be a positive number, got {value!r}")
    if "tie_word_embeddings" in cfg and not isinstance(cfg["tie_word_embeddings"], bool):
        raise KDTuneError(f"{source}: tie_word_embeddings must be true or false, got {cfg['tie_word_embeddings']!r}")


def _refuse_unimplemented(cfg: dict, model_type: str, source: str) -> None:
    """Settings that would change the computation in ways this decoder does not implement."""
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise KDTuneError(f"{source}: use_sliding_window=true is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise KDTuneError(f"{source}: use_bidirectional_attention=true (an embedding model) is not supported")
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        if cfg.get(key):
            raise KDTuneError(f"{source}: {key}={cfg[key]} is not supported (kdtune trains without dropout there)")
    if model_type not in GEMMA:
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            if cfg.get(key) is not None:
                raise KDTuneError(f"{source}: {key} is a Gemma setting; model_type {model_type!r} does not use it")


def _attention_pattern(cfg: dict, model_type: str, layers: int, source: str):
    """(sliding_window, layer_types): which layers attend to a sliding window of how many positions."""
    window = cfg.get("sliding_window", 4096 if model_type in (*GEMMA, "mistral") else None)
    if model_type in ("llama", "qwen2", "qwen3") or window is None:
        return None, None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise KDTuneError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    types = cfg.get("layer_types")
    if types is not None and model_type not in GEMMA:
        raise KDTuneError(f"{source}: layer_types: {model_type} applies its sliding window to every layer "
                          f"(transformers does not read layer_types for it)")
    if types is None:
        if model_type == "gemma2":  # even layers local, odd layers global
            types = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
        elif model_type == "gemma3_text":  # every pattern-th layer global
            pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
            types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)]
        else:  # Mistral, Phi-3: every layer
            types = [SLIDING] * layers
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {FULL, SLIDING}:
        raise KDTuneError(f"{source}: layer_types must list {FULL!r} or {SLIDING!r} for each of the {layers} layers")
    return window, tuple(types)


def _rope(cfg: dict, model_type: str, source: str):
    """((theta, scaling), local (theta, scaling) or None), from either the classic ``rope_theta`` /
    ``rope_scaling`` (/ ``rope_local_base_freq``) keys or the ``rope_parameters`` dict newer
    transformers versions write (per layer type for Gemma 3)."""
    gemma3 = model_type == "gemma3_text"
    default_theta = 1000000.0 if gemma3 else 10000.0  # transformers' defaults (Gemma 3: of its global layers)
    local = (float(cfg.get("rope_local_base_freq", 10000.0)), None) if gemma3 else None
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        full = _rope_one(dict(params[FULL], rope_theta=params[FULL].get("rope_theta", default_theta)), cfg, source)
        return full, local if params.get(SLIDING) is None else _rope_one(params[SLIDING], cfg, source)
    params = params or cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
    return _rope_one(dict(params, rope_theta=theta), cfg, source), local


def _rope_one(params: dict, cfg: dict, source: str) -> tuple[float, dict | None]:
    """(theta, scaling) of one RoPE: scaling None, or a dict with ``rope_type`` llama3, linear or longrope."""
    theta = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") and cfg.get("model_type") == "phi3" else kind  # Phi-3's old names
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise KDTuneError(f"{source}: partial_rotary_factor={partial} is not supported (kdtune rotates the whole head)")
    if kind == "default":
        return theta, None
    keys = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "linear": ("factor",), "longrope": ("short_factor", "long_factor")}
    if kind not in keys:
        raise KDTuneError(f"{source}: unsupported rope scaling type {kind!r} (supported: default, {', '.join(keys)})")
    missing = [k for k in keys[kind] if k not in params]
    if missing:
        raise KDTuneError(f"{source}: {kind} rope scaling is missing {', '.join(missing)}")
    scaling = {"rope_type": kind, **{k: params[k] for k in keys[kind]}}
    if kind == "longrope":
        # the config's top-level key first, as transformers reads Phi-3's
        original = cfg.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
        if original is None:
            raise KDTuneError(f"{source}: longrope rope scaling needs original_max_position_embeddings")
        factor = params.get("factor") or cfg.get("max_position_embeddings", original) / original
        attention = params.get("attention_factor")
        if attention is None:  # the LongRoPE paper's choice, as transformers makes it
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling.update(short_factor=tuple(params["short_factor"]), long_factor=tuple(params["long_factor"]),
                       original_max_position_embeddings=original, attention_factor=float(attention))
    return theta, scaling
