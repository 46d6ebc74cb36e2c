"""GGUF in for every supported family: GGUF files written here with the gguf package the way
llama.cpp writes them (a Llama's q/k rows reordered for its rotary embedding, Qwen's as they are;
some tensors quantized) convert back into folders whose logits equal the original checkpoint's,
and whose tokenizer equals the original tokenizer.json (the real Qwen2.5 one included). The real
SmolLM2 GGUF file is tested in tests/real."""

import json

import numpy as np
import pytest
import torch

import kdtune
from kdtune.checkpointing.hf_format import iter_tensors
from tests.checkpointing.conftest import assert_same_tokenizer
from tests.cli_utils import ASSETS, assert_user_error, run_kdtune
from tests.models.tiny import CONFIGS, make_checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf package reads and writes GGUF files")
TEXTS = ["Hello world 123, how are you?", "  spaces\n\nand\ttabs 4567", "Ünïcödé ñ 你好 🙂 x**2 // 7"]
GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a Llama q/k projection: within each head the two halves
    of the rotary pairs interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    parts = hf_name.removeprefix("model.").split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{LAYER_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[-1]}"


def write_gguf(folder, tokenizer_dir, path, *, pre: str, quantize=("ffn_up",)) -> None:
    """A GGUF file of the HF checkpoint ``folder`` and the tokenizer files of ``tokenizer_dir``."""
    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    writer.add_eos_token_id(vocab[tok_config["eos_token"] if isinstance(tok_config["eos_token"], str)
                                  else tok_config["eos_token"]["content"]])
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
    for hf_name, tensor in iter_tensors(folder):
        array = tensor.float().numpy()
        name = gguf_name(hf_name)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            array = llama_cpp_permute(array, heads if "attn_q" in name else kv)
        if any(f".{q}." in name for q in quantize) and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    from kdtune.tokenization.build import train_chatml_tokenizer

    texts = [f"What is {i} + {i * 3}? It is {i * 4}. Hello world, how are you today?" for i in range(200)]
    return train_chatml_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_gguf_file_converts_back_to_the_same_model(family, chatml_tokenizer, tmp_path):
    original = make_checkpoint(family, tmp_path / "original")
    for f in chatml_tokenizer.iterdir():
        (original / f.name).write_bytes(f.read_bytes())
    path = tmp_path / f"{family}.gguf"
    write_gguf(original, chatml_tokenizer, path, pre="smollm", quantize=())
    out = tmp_path / "converted"
    proc = run_kdtune("convert", "gguf", path, out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    tokens = torch.randint(0, CONFIGS[family]["vocab_size"], (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(kdtune.load_model(out)(tokens), kdtune.load_model(original)(tokens),
                                   rtol=1e-6, atol=1e-6)
    assert_same_tokenizer(out, original, TEXTS)


def test_quantized_tensors_are_dequantized(chatml_tokenizer, tmp_path):
    original = make_checkpoint("qwen2", tmp_path / "original")
    for f in chatml_tokenizer.iterdir():
        (original / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "q8.gguf"
    write_gguf(original, chatml_tokenizer, path, pre="smollm", quantize=("ffn_up", "ffn_gate", "attn_q"))
    out = tmp_path / "converted"
    assert run_kdtune("convert", "gguf", path, out, "--dtype", "fp32").returncode == 0
    converted = dict(iter_tensors(out))
    for name, tensor in iter_tensors(original):
        # Q8_0 keeps 8 bits per weight with a scale per 32: within half a step of the block's scale.
        quantized = any(part in name for part in ("up_proj", "gate_proj", "q_proj"))
        tol = tensor.abs().max().item() / 127 if quantized else 0
        torch.testing.assert_close(converted[name], tensor.float(), rtol=0, atol=tol, msg=name)


def test_the_qwen2_pre_tokenizer_equals_qwen25s_tokenizer_json(tmp_path):
    """The real Qwen2.5 tokenizer (151,665 ids) through a GGUF file and back."""
    original = make_checkpoint("qwen2", tmp_path / "original")
    config = json.loads((original / "config.json").read_text())
    path = tmp_path / "qwen.gguf"
    # Only the tokenizer is compared: a tiny model with the real tokenizer's metadata.
    write_gguf(original, ASSETS / "qwen2_5_tokenizer", path, pre="qwen2", quantize=())
    out = tmp_path / "converted"
    proc = run_kdtune("convert", "gguf", path, out)
    assert proc.returncode == 0, proc.stderr
    ours, theirs = kdtune.load_tokenizer(out), kdtune.load_tokenizer(ASSETS / "qwen2_5_tokenizer")
    texts = TEXTS + ["def f(x):\n    return x  # 12345678\r\n", "I'm  THERE'S   they'll\n\n\n  ok", "a,b;c!?  ..."]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
    assert config["model_type"] == "qwen2"


def test_what_convert_cannot_do_is_one_line(tmp_path):
    reader_path = tmp_path / "scaled.gguf"
    writer = gguf.GGUFWriter(str(reader_path), "llama")  # a Llama with YaRN rope scaling
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for bad, fragment in ((reader_path, "rope scaling (yarn)"),):
        assert_user_error(run_kdtune("convert", "gguf", bad, tmp_path / "out"), fragment)
    other = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    other.write_header_to_file()
    other.write_kv_data_to_file()
    other.write_tensors_to_file()
    other.close()
    assert_user_error(run_kdtune("convert", "gguf", tmp_path / "mamba.gguf", tmp_path / "out"), "architecture 'mamba'")
    assert not (tmp_path / "out").exists()
