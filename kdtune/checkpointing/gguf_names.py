"""How each family's Hugging Face checkpoint and its GGUF file (llama.cpp's layout) name things.

Shared by the reader (``from_gguf``) and the writer (``to_gguf``), so that the two stay inverse.
Mistral is stored as a Llama (llama.cpp has no separate graph for it); Gemma 3's text model is the
``gemma3`` architecture.
"""

from __future__ import annotations

# Hugging Face model_type -> GGUF general.architecture
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3"}
# GGUF general.architecture -> the Hugging Face model_type and class a file converts back into
HF_MODEL = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
            "qwen3": ("qwen3", "Qwen3ForCausalLM"), "phi3": ("phi3", "Phi3ForCausalLM"),
            "gemma2": ("gemma2", "Gemma2ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}

_ATTENTION = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_SWIGLU = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_PRE_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# Gemma's four norms per layer: llama.cpp calls the one before the MLP ffn_norm.
_SANDWICH = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
# Phi-3 keeps its fused projections; llama.cpp splits ffn_up (gate first, as Hugging Face does).
_PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}

TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def layer_modules(arch: str) -> dict[str, str]:
    """Hugging Face module (under ``model.layers.N``) -> GGUF tensor part (under ``blk.N``)."""
    if arch == "phi3":
        return {**_PHI3, **_PRE_NORM}
    if arch in ("gemma2", "gemma3"):
        return {**_ATTENTION, **_SWIGLU, **_SANDWICH}
    return {**_ATTENTION, **_SWIGLU, **_PRE_NORM}


def gguf_name(hf_name: str, arch: str) -> str | None:
    if hf_name in TOP_TENSORS:
        return TOP_TENSORS[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight|bias
    module = ".".join(parts[3:-1])
    if parts[:2] == ["model", "layers"] and module in layer_modules(arch):
        return f"blk.{parts[2]}.{layer_modules(arch)[module]}.{parts[-1]}"
    return None


def hf_name(name: str, arch: str) -> str | None:
    for hf, gguf in TOP_TENSORS.items():
        if name == gguf:
            return hf
    parts = name.split(".")  # blk.N.<part>.weight|bias
    by_part = {part: module for module, part in layer_modules(arch).items()}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in by_part:
        return f"model.layers.{parts[1]}.{by_part[parts[2]]}.{parts[3]}"
    return None


def llama_permute(weight, heads: int):
    """llama.cpp's storage of a Llama q/k projection (numpy or torch): within each head, the rows of
    the two rotary halves interleaved as pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_unpermute(weight, heads: int):
    """The inverse of :func:`llama_permute`: Hugging Face keeps the two halves apart."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gemma_attention_scalar(model_type: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's Gemma graphs imply (they fix it rather than read it):
    head_dim, but hidden/heads at the layer counts of the 27B models (Gemma 2: 46, Gemma 3: 62)."""
    is_27b = layers == {"gemma2": 46, "gemma3_text": 62}.get(model_type)
    return hidden // heads if is_27b else head_dim
