"""A Hugging Face checkpoint folder in, one GGUF file (llama.cpp, Ollama, LM Studio) out.

The ``gguf`` package writes the file and quantizes its tensors; the layout is llama.cpp's (see
``gguf_names``): a Llama's q/k rows reordered for its rotary embedding, Gemma's norm weights stored
as ``1 + weight``, Phi-3's fused projections kept fused. The tokenizer goes in as llama.cpp's
byte-level BPE vocabulary (tokens, merges, token types, special ids, chat template) under the
pre-tokenizer name whose splitting reproduces ``tokenizer.json``: each candidate is rebuilt from the
file's own vocabulary and must encode a set of probe texts exactly as the checkpoint's tokenizer does.

What llama.cpp would run differently from the checkpoint is refused, never written: a sliding
window it ignores (Mistral, Phi-3), an attention scale or layer pattern it fixes per architecture
(Gemma), RoPE scalings it has no form for (LongRoPE), a tokenizer that is not byte-level BPE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from kdtune.checkpointing import spm
from kdtune.checkpointing.gguf_names import GGUF_ARCH, gemma_attention_scalar, gguf_name, llama_permute
from kdtune.checkpointing.hf_format import CONFIG, iter_tensors, read_config
from kdtune.errors import KDTuneError
from kdtune.models.args import SLIDING, ModelArgs
from kdtune.modules.rope import rope_frequencies

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # the block length of q8_0 and q4_0: rows of other lengths stay at f16
# Texts whose pre-tokenization tells the candidates apart: digit runs, contractions, code, runs of
# spaces and newlines, non-Latin scripts, punctuation runs.
PROBES = ["Hello world 1234567, how are you?", "HelloWorld getHTTPResponse ab12cd", "I'm  THERE'S   they'll\n\n\n  ok", "def f(x):\n    return x  # 12\r\n",
          "Ünïcödé ñ 你好 🙂 x**2 // 7", "a,b;c!?  ...  \t\tend", "2024-12-06 3.14159 1,000,000"]
_PRE_CANDIDATES = ("qwen2", "llama-bpe", "smollm", "gpt-2")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def export_gguf(checkpoint_dir: str | Path, out_path: str | Path, *, qtype: str = "f16") -> Path:
    """Write ``out_path`` (a new file) from the Hugging Face folder ``checkpoint_dir``."""
    import gguf

    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    if qtype not in TYPES:
        raise KDTuneError(f"--type: expected one of {', '.join(TYPES)}, got {qtype!r}")
    if out_path.exists():
        raise KDTuneError(f"{out_path}: already exists (choose a new file; nothing was overwritten)")
    if not out_path.parent.is_dir():
        raise KDTuneError(f"{out_path.parent}: no such folder")
    config = read_config(checkpoint_dir)
    args = ModelArgs.from_hf_config(config, str(checkpoint_dir / CONFIG))
    _refuse_unrepresentable(args, config, checkpoint_dir / CONFIG)
    arch = GGUF_ARCH[args.model_type]
    vocab = _vocabulary(checkpoint_dir, args.vocab_size)

    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_metadata(writer, args, config, checkpoint_dir, qtype)
        _write_vocabulary(writer, vocab)
        _write_tensors(writer, checkpoint_dir, args, arch, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, out_path)  # the final name appears complete, and never over a file made meanwhile
        except FileExistsError:
            raise KDTuneError(f"{out_path}: already exists (choose a new file; nothing was overwritten)") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves no partial file
    return out_path


def _refuse_unrepresentable(args: ModelArgs, config: dict, source: Path) -> None:
    def refuse(what: str) -> None:
        raise KDTuneError(f"{source}: {what}; llama.cpp would run this model differently, so no GGUF file was written")

    gemma = args.model_type in ("gemma2", "gemma3_text")
    activation = "gelu_pytorch_tanh" if gemma else "silu"  # fixed in each of llama.cpp's graphs
    if args.hidden_act != activation:
        refuse(f"MLP activation {args.hidden_act} (llama.cpp's {GGUF_ARCH[args.model_type]} graph uses {activation})")
    if args.sliding_window is not None and not gemma and args.sliding_window < args.max_position_embeddings:
        refuse(f"sliding_window={args.sliding_window} below max_position_embeddings={args.max_position_embeddings} "
               f"(llama.cpp's {GGUF_ARCH[args.model_type]} graph attends to every position)")
    for scaling in (args.rope_scaling, args.local_rope_scaling):
        if scaling is not None and scaling["rope_type"] not in ("linear", "llama3"):
            refuse(f"{scaling['rope_type']} rope scaling is not written by kdtune (linear and llama3 are)")
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "llama3" and args.model_type != "llama":
        refuse("llama3 rope scaling outside a Llama model")
    if gemma:
        scalar = config.get("query_pre_attn_scalar", 256)
        fixed = gemma_attention_scalar(args.model_type, args.num_layers, args.hidden_size, args.num_heads,
                                       args.head_dim)
        if scalar != fixed:
            refuse(f"query_pre_attn_scalar={scalar} differs from the {fixed} that llama.cpp uses for a "
                   f"{args.model_type} of {args.num_layers} layers")
        if args.model_type == "gemma2" and not (args.attn_logit_softcapping and args.final_logit_softcapping):
            refuse("Gemma 2 without both softcaps (llama.cpp's Gemma 2 graph caps at 50/30 when none is given)")
        if args.model_type == "gemma2":
            expected = tuple(SLIDING if i % 2 == 0 else "full_attention" for i in range(args.num_layers))
        else:
            expected = tuple("full_attention" if (i + 1) % 6 == 0 else SLIDING for i in range(args.num_layers))
            if args.local_rope_theta not in (None, 10000.0) or args.local_rope_scaling is not None:
                refuse(f"local RoPE base {args.local_rope_theta} (llama.cpp's Gemma 3 uses 10000, unscaled)")
            if args.attn_logit_softcapping or args.final_logit_softcapping:
                refuse("logit softcapping on Gemma 3 (llama.cpp's Gemma 3 graph has none)")
        if args.layer_types is not None and args.layer_types != expected:
            refuse(f"layer_types {list(args.layer_types)} differ from llama.cpp's fixed pattern for {args.model_type}")
        if args.sliding_window is None:
            refuse("no sliding_window (llama.cpp's Gemma graphs always alternate local and global layers)")


# -- the tokenizer ---------------------------------------------------------------------------------


def _token_id(vocab: dict, token) -> int | None:
    content = token.get("content") if isinstance(token, dict) else token
    return vocab.get(content) if content is not None else None


def _vocabulary(folder: Path, rows: int) -> dict:
    """The GGUF tokenizer fields (``tokenizer.ggml.*``) for the folder's ``tokenizer.json``."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise KDTuneError(f"{path}: missing (a GGUF file carries its tokenizer; copy the tokenizer files into the "
                          f"checkpoint folder)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    sentencepiece_style = model.get("type") == "BPE" and model.get("byte_fallback")
    if not sentencepiece_style and (model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer"))):
        raise KDTuneError(f"{path}: a {model.get('type')} tokenizer that is neither byte-level BPE (Llama 3, Qwen, "
                          f"SmolLM2) nor sentencepiece-style BPE with byte fallback (Llama 2, Mistral, Phi-3-mini, "
                          f"Gemma) is not written by kdtune convert to-gguf")
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    if max(ids.values()) >= rows:
        raise KDTuneError(f"{path}: token id {max(ids.values())} does not fit the model's {rows} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(rows)]  # rows past the tokenizer: unused, as llama.cpp pads them
    types = [_TOKEN_UNUSED] * rows
    original = Tokenizer.from_file(str(path))
    if sentencepiece_style:  # pieces with scores, as llama.cpp's "llama" tokenizer merges them
        pieces, piece_scores, piece_types = spm.pieces_of(spec)
        scores = [0.0] * rows
        tokens[:len(pieces)], scores[:len(pieces)], types[:len(pieces)] = pieces, piece_scores, piece_types
        fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                  "tokenizer.ggml.add_space_prefix": spm.adds_space_prefix(original)}
    else:
        for token, i in ids.items():
            tokens[i], types[i] = token, _TOKEN_NORMAL
        for added in spec.get("added_tokens", []):
            types[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
        fields = {"tokenizer.ggml.model": "gpt2",
                  "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]}
    fields.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                   "general.architecture": "kdtune"})

    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.is_file() else {}
    config = read_config(folder)
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = _token_id(ids, tok_config.get(f"{key}_token"))
        if token_id is None:
            token_id = config.get(f"{key}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) else token_id
        if token_id is not None:
            fields[f"tokenizer.ggml.{gguf_key}_token_id"] = int(token_id)
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    fields["tokenizer.ggml.add_bos_token"] = bos is not None and original.encode("a").ids[:1] == [bos]
    if sentencepiece_style:
        fields["tokenizer.ggml.add_eos_token"] = eos is not None and original.encode("a").ids[-1:] == [eos]
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        fields["tokenizer.chat_template"] = template
    if sentencepiece_style:
        _check_pieces(fields, original, path)
    else:
        fields["tokenizer.ggml.pre"] = _pre_tokenizer(fields, original, path)
    return fields


def _check_pieces(fields: dict, original, path: Path) -> None:
    """The vocabulary as llama.cpp rebuilds it encodes the probes as ``original`` does (a text that
    starts with a space aside: sentencepiece, and llama.cpp, put the space prefix before it anyway,
    where some tokenizer.json files do not)."""
    from tokenizers import Tokenizer

    from kdtune.checkpointing.from_gguf import Metadata, tokenizer_files

    spec, _ = tokenizer_files(Metadata(fields, path))
    rebuilt = Tokenizer.from_str(json.dumps(spec))
    for text in (probe.lstrip() for probe in PROBES):
        if rebuilt.encode(text).ids != original.encode(text).ids:
            raise KDTuneError(f"{path}: its sentencepiece-style vocabulary, as llama.cpp rebuilds it, encodes "
                              f"{text[:40]!r} unlike the tokenizer (a normalizer llama.cpp does not run?); no GGUF "
                              f"file was written")


def _pre_tokenizer(fields: dict, original, path: Path) -> str:
    """The llama.cpp pre-tokenizer name under which the vocabulary encodes the probes as ``original``."""
    from tokenizers import Tokenizer

    from kdtune.checkpointing.from_gguf import Metadata, tokenizer_files

    def behaviour(tokenizer):  # how it splits each probe, and the ids it gives
        return [(tokenizer.pre_tokenizer.pre_tokenize_str(text), tokenizer.encode(text, add_special_tokens=False).ids)
                for text in PROBES]

    expected = behaviour(original)
    for name in _PRE_CANDIDATES:
        spec, _ = tokenizer_files(Metadata({**fields, "tokenizer.ggml.pre": name}, path))
        if behaviour(Tokenizer.from_str(json.dumps(spec))) == expected:
            return name
    raise KDTuneError(f"{path}: its pre-tokenizer splits text unlike any llama.cpp pre-tokenizer kdtune knows "
                      f"({', '.join(_PRE_CANDIDATES)}); no GGUF file was written")


def _write_vocabulary(writer, fields: dict) -> None:
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in fields:
        writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in fields:
        writer.add_token_merges(fields["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in fields:
        writer.add_token_scores(fields["tokenizer.ggml.scores"])
        writer.add_add_space_prefix(fields["tokenizer.ggml.add_space_prefix"])
        writer.add_add_eos_token(fields["tokenizer.ggml.add_eos_token"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("padding", writer.add_pad_token_id), ("unknown", writer.add_unk_token_id)):
        if f"tokenizer.ggml.{key}_token_id" in fields:
            add(fields[f"tokenizer.ggml.{key}_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    if "tokenizer.chat_template" in fields:
        writer.add_chat_template(fields["tokenizer.chat_template"])


# -- metadata and tensors --------------------------------------------------------------------------


def _file_type(qtype: str):
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[qtype]


def _write_metadata(writer, args: ModelArgs, config: dict, folder: Path, qtype: str) -> None:
    from gguf import RopeScalingType

    writer.add_name(config.get("_name_or_path") or folder.resolve().name)
    writer.add_block_count(args.num_layers)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(2)
    scaling = args.rope_scaling
    if scaling is not None and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling is not None:  # llama3: the factors go in rope_freqs.weight; the parameters for the way back
        writer.add_string("kdtune.rope_scaling", json.dumps(scaling))
    if args.model_type in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(args.sliding_window)
        if args.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(args.attn_logit_softcapping)
        if args.final_logit_softcapping:
            writer.add_final_logit_softcapping(args.final_logit_softcapping)


def _stored(array: np.ndarray, name: str, qtype: str):
    """(data, raw type) of one tensor in the file: 1-D tensors (norms, biases) stay float32 as in
    llama.cpp's own files; q4_0 keeps the embedding and output layer at q8_0 (kdtune's choice: they
    suffer most from 4 bits; llama-quantize gives the output layer 6 bits); rows not a multiple of 32
    long fall back to f16, and f16 to f32 where a weight is beyond float16's range."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if array.ndim < 2 or qtype == "f32":
        return array.astype(np.float32), None
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    if kind == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        kind = Q.Q8_0
    if kind in (Q.Q8_0, Q.Q4_0) and array.shape[-1] % BLOCK:
        kind = Q.F16
    if kind == Q.F16 and np.abs(array).max() > np.finfo(np.float16).max:
        return array.astype(np.float32), None
    if kind == Q.F16:
        return array.astype(np.float16), None
    return quants.quantize(array.astype(np.float32), kind), kind


def _write_tensors(writer, folder: Path, args: ModelArgs, arch: str, qtype: str) -> None:
    for hf, tensor in iter_tensors(folder):
        name = gguf_name(hf, arch)
        if name is None:
            raise KDTuneError(f"{folder}: tensor {hf!r} has no place in llama.cpp's {arch} layout")
        array = tensor.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            array = llama_permute(array, args.num_heads if ".attn_q." in name else args.num_kv_heads)
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp's Gemma norms scale by the stored weight itself
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        data, raw = _stored(np.ascontiguousarray(array), name, qtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "llama3":
        plain = rope_frequencies(args.head_dim, args.rope_theta)
        scaled = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        # llama.cpp divides each frequency by its factor
        writer.add_tensor("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32))
