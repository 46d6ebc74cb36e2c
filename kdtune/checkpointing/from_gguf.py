"""GGUF files (llama.cpp, Ollama) in: a Hugging Face checkpoint folder out.

The ``gguf`` package reads the file and dequantizes its tensors; ``tokenizers`` builds
``tokenizer.json`` from the file's vocabulary, merges and pre-tokenizer type. The folder gets
``config.json`` from the GGUF metadata, the weights under their Hugging Face names in safetensors,
``tokenizer.json``, ``tokenizer_config.json`` (special tokens and the chat template) and
``generation_config.json``: any kdtune recipe, and transformers, can use it.

llama.cpp stores a Llama model's query and key projections with the rows of each head reordered for
its rotary embedding (pairs interleaved), and Gemma's norm weights with the 1 of its ``(1 + weight)``
added; converting back undoes both. Attention choices llama.cpp fixes per architecture rather than
storing (Gemma's attention scale 1/sqrt(head_dim), Gemma 3's local RoPE base 10,000 and its
one-global-in-six layer pattern) are written into ``config.json`` as llama.cpp runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kdtune.checkpointing import spm
from kdtune.checkpointing.atomic import atomic_directory
from kdtune.checkpointing.gguf_names import HF_MODEL, gemma_attention_scalar, hf_name, llama_unpermute
from kdtune.checkpointing.hf_format import CONFIG, dtype_name, write_weights
from kdtune.errors import KDTuneError

# The pre-tokenizer regexes of llama.cpp's pre-tokenizer types (tokenizer.ggml.pre), as the
# families' own tokenizer.json files split text before byte-level BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_TOKENIZERS = {
    "gpt-2": ("byte_level", None),
    "gpt2": ("byte_level", None),  # an older spelling
    "smollm": ("digits", None),  # every digit alone, then GPT-2's split
    "qwen2": ("split", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "llama-bpe": ("split", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are added (special) tokens


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise KDTuneError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors ... for damaged files
        raise KDTuneError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    if any(t.data_offset + t.n_bytes > size for t in reader.tensors):
        raise KDTuneError(f"{path}: truncated ({size:,} bytes; its tensors need more)")
    return reader


class Metadata:
    """GGUF key/value metadata as plain values (a file's, or one being written), read key by key,
    a missing one named in the error."""

    def __init__(self, fields: dict, path: Path):
        self.fields, self.path = fields, path

    @classmethod
    def of(cls, reader, path: Path) -> "Metadata":
        return cls({key: field.contents() for key, field in reader.fields.items()}, path)

    def get(self, key: str, default=None):
        value = self.fields.get(key)
        return default if value is None else value

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise KDTuneError(f"{self.path}: the GGUF metadata has no {key}")
        return value


def _hf_config(meta: Metadata, arch: str, tensors: dict, vocab_size: int) -> dict:
    model_type, architecture = HF_MODEL[arch]
    hidden, heads = meta.need(f"{arch}.embedding_length"), meta.need(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    config = {
        "architectures": [architecture], "model_type": model_type, "hidden_size": hidden,
        "intermediate_size": meta.need(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.need(f"{arch}.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads), "head_dim": head_dim,
        # GGUF stores it as float32: its shortest decimal (1e-05, not 9.99999974e-06) is the original
        "rms_norm_eps": _float32(meta.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048), "vocab_size": vocab_size,
        "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch in ("llama", "qwen3"):  # Qwen2 always has q/k/v bias; Phi-3 and Gemma none
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_down.bias" in tensors
    if arch in ("gemma2", "gemma3"):
        # what llama.cpp runs when the file does not say: a 4096 window, Gemma 2 capped at 50/30, and
        # the attention scale it fixes by layer count (1/sqrt(hidden/heads) for the 27B models)
        scalar = gemma_attention_scalar(model_type, config["num_hidden_layers"], hidden, heads, head_dim)
        config.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
                      sliding_window=int(meta.get(f"{arch}.attention.sliding_window", 4096)))
        for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
            cap = meta.get(f"{arch}.{key}", default if arch == "gemma2" else None)
            config[key] = None if cap is None else _float32(cap)
        if arch == "gemma3":
            config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)
    scaling = _rope_scaling(meta, arch, tensors)
    if scaling is not None:
        config["rope_scaling"] = scaling
    for key in ("bos", "eos", "padding"):
        token = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = int(token)
    return config


def _float32(value) -> float:
    """GGUF keeps floats in float32: the shortest decimal of that (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: Metadata, arch: str, tensors: dict) -> dict | None:
    """Linear scaling from the metadata; Llama 3's from the ``rope_freqs`` tensor, whose parameters
    kdtune's writer also records (``kdtune.rope_scaling``): llama.cpp keeps only the per-frequency
    factors, which do not give the four parameters back."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        recorded = meta.get("kdtune.rope_scaling")
        if kind in (None, "none") and recorded:
            return json.loads(recorded)
        raise KDTuneError(f"{meta.path}: rope scaling by per-frequency factors (rope_freqs.weight) is only read "
                          f"back from files kdtune wrote; convert the original Hugging Face checkpoint instead")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32(meta.need(f"{arch}.rope.scaling.factor"))}
    raise KDTuneError(f"{meta.path}: rope scaling ({kind}) is not supported by kdtune convert; convert the "
                      f"original Hugging Face checkpoint instead")


def tokenizer_files(meta: Metadata) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) contents for a GGUF vocabulary: byte-level BPE (``gpt2``)
    or sentencepiece-style (``llama``)."""
    kind = meta.need("tokenizer.ggml.model")
    if kind == "llama":
        tokens = meta.need("tokenizer.ggml.tokens")
        spec = spm.tokenizer_json(
            tokens, meta.need("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.token_type") or [1] * len(tokens),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"), bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
        return spec, _tokenizer_config(meta, tokens, bool(meta.get("tokenizer.ggml.add_bos_token", True)))
    if kind != "gpt2":
        raise KDTuneError(f"{meta.path}: tokenizer type '{kind}' is not supported by kdtune convert (only "
                          f"byte-level BPE, 'gpt2', as Llama 3, Qwen and SmolLM2 use, and sentencepiece-style, "
                          f"'llama', as Llama 2, Mistral, Phi-3-mini and Gemma use)")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise KDTuneError(f"{meta.path}: pre-tokenizer '{pre}' is not supported by kdtune convert "
                          f"(supported: {', '.join(_PRE_TOKENIZERS)})")
    tokens = meta.need("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False, ignore_merges=pre == "llama-bpe"))
    how, regex = _PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=how != "split")
    if how == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif how == "split":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, int(bos_id))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    from tokenizers import AddedToken

    added = [(i, t) for i, (t, kind_id) in enumerate(zip(tokens, types)) if kind_id in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in added if types[i] == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for i, t in added if types[i] == _USER_DEFINED])
    return json.loads(tok.to_str()), _tokenizer_config(meta, tokens, add_bos)


def _tokenizer_config(meta: Metadata, tokens: list[str], add_bos: bool) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": add_bos, "model_max_length": meta.get(f"{meta.need('general.architecture')}"
                                                                     f".context_length", 2048)}
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[{"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")] = tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def convert_gguf(path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                 max_shard_size: int | str = "5GB") -> Path:
    """Write the Hugging Face folder ``out_dir`` (a new one) for the GGUF file ``path``."""
    from gguf import quants

    path, out_dir = Path(path), Path(out_dir)
    reader = _open(path)
    meta = Metadata.of(reader, path)
    arch = meta.need("general.architecture")
    if arch not in HF_MODEL:
        raise KDTuneError(f"{path}: architecture '{arch}' is not supported by kdtune (supported: "
                          f"{', '.join(HF_MODEL)})")
    tensors = {t.name: t for t in reader.tensors}
    unknown = sorted(name for name in tensors if hf_name(name, arch) is None and name != "rope_freqs.weight")
    if unknown:
        raise KDTuneError(f"{path}: tensor '{unknown[0]}' has no Hugging Face counterpart for {arch}")
    _rope_scaling(meta, arch, tensors)  # what cannot be read back is refused before anything else
    tokenizer, tokenizer_config = tokenizer_files(meta)
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    config = _hf_config(meta, arch, tensors, vocab_size)
    config["torch_dtype"] = dtype_name(dtype)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def tensor(name: str) -> torch.Tensor:
        t = by_hf[name]
        try:
            array = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise KDTuneError(f"{path}: {t.name} is quantized as {t.tensor_type.name}, which the gguf package "
                              f"cannot dequantize") from None
        array = np.array(array, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])  # a writable copy
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            array = llama_unpermute(array, heads if ".attn_q." in t.name else kv_heads)
        if arch in ("gemma2", "gemma3") and t.name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma's (1 + weight)
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

    by_hf = {hf_name(name, arch): t for name, t in tensors.items() if hf_name(name, arch)}
    element = torch.empty((), dtype=dtype).element_size()
    sizes = {name: int(t.n_elements) * element for name, t in by_hf.items()}
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        write_weights(tmp, sizes, tensor, max_shard_size)
    return out_dir
