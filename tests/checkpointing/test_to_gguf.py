"""GGUF out for every supported family: `kdtune convert to-gguf` writes llama.cpp's layout, and the
file comes back through kdtune's own reader and through transformers' GGUF loader with the
checkpoint's logits (f32 exactly; f16/bf16 to their rounding), the same greedy tokens, and the
same tokenizer. Quantized files hold each weight to its block's step. What llama.cpp would run
differently is refused in one line. The real SmolLM2 round trip is in tests/real."""

import json
import shutil

import numpy as np
import pytest
import torch

import kdtune
from kdtune.checkpointing.from_gguf import convert_gguf
from kdtune.checkpointing.gguf_names import gguf_name
from kdtune.checkpointing.hf_format import iter_tensors
from kdtune.checkpointing.to_gguf import export_gguf
from tests.checkpointing.conftest import assert_same_tokenizer
from tests.cli_utils import ASSETS, assert_user_error, run_kdtune
from tests.models.tiny import make_checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf package writes GGUF files")
ROWS = 416  # embedding rows: more than the tokenizer's 400 ids, as real checkpoints pad theirs
TEXTS = ["What is 12 + 36? It is 48.", "Hello world, how are you today?\n\n  x", "Ünïcödé 你好 🙂 1234567"]
# Each family as llama.cpp can run it (no sliding window it would ignore, Gemma's attention scale
# 1/sqrt(head_dim)); the rest of the fixture's variety stays (biases, q/k norms, softcaps, Gemma 3's
# local/global pattern with linear scaling on its global layers, Llama 3 rope scaling).
FAMILIES = {
    "llama": {},
    "llama3_scaled": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": None},
    "phi3": {"sliding_window": None, "rope_scaling": None},
    "gemma2": {"query_pre_attn_scalar": 32},
    "gemma3_text": {},
}
# What transformers' GGUF loader reads back: it takes head_dim only for Llama/Mistral and Gemma
# (Qwen3's it assumes 128), and for Gemma it reads neither the softcaps nor an attention scale nor
# rope scaling (it assumes 50/30, 256 and none), and it ignores Llama 3's rope_freqs: these configs
# keep to what it assumes.
TRANSFORMERS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 128},
    "mistral": {"sliding_window": None},
    "phi3": {"sliding_window": None, "rope_scaling": None},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256,
                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
}


def checkpoint(family, folder, tokenizer_dir, **changes):
    make_checkpoint(family, folder, vocab_size=ROWS, **changes)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def to_gguf(folder, out, qtype):
    proc = run_kdtune("convert", "to-gguf", folder, out, "--type", qtype)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"Wrote {out} ({qtype}" in proc.stdout
    return out


def from_gguf(path, out):
    proc = run_kdtune("convert", "gguf", path, out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    return out


def greedy(forward, prompt, steps=8):
    ids = prompt.clone()
    for _ in range(steps):
        ids = torch.cat([ids, forward(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[:, prompt.shape[1]:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kdtunes_reader_gets_the_checkpoint_back(family, tokenizer_dir, tmp_path):
    original = checkpoint(family, tmp_path / "student", tokenizer_dir, **FAMILIES[family])
    tokens = torch.randint(0, ROWS, (2, 13), generator=torch.Generator().manual_seed(0))
    model = kdtune.load_model(original)
    with torch.no_grad():
        expected = model(tokens)
    back = from_gguf(to_gguf(original, tmp_path / "f32.gguf", "f32"), tmp_path / "f32")
    with torch.no_grad():
        torch.testing.assert_close(kdtune.load_model(back)(tokens), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(greedy(kdtune.load_model(back), tokens), greedy(model, tokens))
    assert_same_tokenizer(back, original, TEXTS)
    # f16 and bf16 (through the API: the CLI is the same call): each matrix is the original rounded
    # to that type; vectors (norms) stay f32
    weights = dict(iter_tensors(original))
    for qtype, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        path = export_gguf(original, tmp_path / f"{qtype}.gguf", qtype=qtype)
        back = dict(iter_tensors(convert_gguf(path, tmp_path / qtype, dtype=torch.float32)))
        for name, weight in weights.items():
            rounded = weight.to(dtype).float() if weight.ndim == 2 else weight.float()
            # Gemma's norms go through 1 + w and back in float32: within an ulp of 1
            torch.testing.assert_close(back[name], rounded, rtol=0, atol=2e-7, msg=name)


@pytest.mark.parametrize("family", list(TRANSFORMERS))
def test_transformers_gguf_loader_gets_the_checkpoint_back(family, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = checkpoint(family, tmp_path / "student", tokenizer_dir, **TRANSFORMERS[family])
    to_gguf(original, tmp_path / "student.gguf", "f32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="student.gguf", dtype=torch.float32).eval()
    ours = kdtune.load_model(original)
    tokens = torch.randint(0, ROWS, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
        assert torch.equal(greedy(lambda ids: theirs(ids).logits, tokens), greedy(ours, tokens))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_files_hold_each_weight_to_its_blocks_step(qtype, tokenizer_dir, tmp_path):
    original = checkpoint("qwen2", tmp_path / "student", tokenizer_dir)
    path = to_gguf(original, tmp_path / f"{qtype}.gguf", qtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == qtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0"  # the embedding keeps 8 bits in a q4_0 file
    back = dict(iter_tensors(from_gguf(path, tmp_path / "back")))
    levels = {"Q8_0": 127, "Q4_0": 8}
    for name, weight in iter_tensors(original):
        if weight.ndim < 2:
            assert torch.equal(back[name], weight.float()), name
            continue
        kind = types[gguf_name(name, "qwen2")]
        blocks = weight.float().reshape(-1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / levels[kind]  # one scale per 32 weights
        error = (back[name].reshape(-1, 32) - blocks).abs()
        # half a step (q4_0: a whole one on the side opposite its extreme, whose levels stop at 7, not
        # 8), plus the scale's own float16 rounding (2^-11 relative) times the largest level
        bound = (0.5 if kind == "Q8_0" else 1.0) + levels[kind] / 2048
        assert (error <= step * bound + 1e-7).all(), name


def test_a_lora_runs_step_folder_exports_its_merged_weights(tokenizer_dir, tmp_path):
    """A LoRA run's step_N holds the merged weights beside adapter/: the file carries the merged ones."""
    step = checkpoint("llama", tmp_path / "step_4", tokenizer_dir)
    (step / "adapter").mkdir()
    (step / "adapter" / "adapter_config.json").write_text("{}")
    back = from_gguf(to_gguf(step, tmp_path / "student.gguf", "f32"), tmp_path / "back")
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(iter_tensors(step), iter_tensors(back)))


def test_what_llama_cpp_would_run_differently_is_refused_in_one_line(tokenizer_dir, tmp_path):
    cases = [
        ("mistral", {}, "sliding_window=8 below max_position_embeddings=256"),
        ("phi3", {"sliding_window": None}, "longrope rope scaling is not written"),
        ("gemma2", {}, "query_pre_attn_scalar=24 differs from the 32 that llama.cpp uses"),
        ("gemma2", {"query_pre_attn_scalar": 32, "final_logit_softcapping": None}, "Gemma 2 without both softcaps"),
        ("gemma3_text", {"layer_types": ["sliding_attention", "full_attention"] * 3 + ["full_attention"]},
         "differ from llama.cpp's fixed pattern"),
        ("llama", {"hidden_act": "gelu_pytorch_tanh"}, "MLP activation gelu_pytorch_tanh"),
    ]
    for i, (family, changes, fragment) in enumerate(cases):
        folder = checkpoint(family, tmp_path / f"{family}{i}", tokenizer_dir, **changes)
        out = tmp_path / f"{family}{i}.gguf"
        assert_user_error(run_kdtune("convert", "to-gguf", folder, out), fragment, "no GGUF file was written")
        assert not out.exists() and not list(tmp_path.glob(".*.tmp*"))


def test_bad_input_is_one_line_and_nothing_is_overwritten(tokenizer_dir, tmp_path):
    folder = checkpoint("qwen2", tmp_path / "student", tokenizer_dir)
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    assert_user_error(run_kdtune("convert", "to-gguf", folder, existing), "already exists")
    assert existing.read_bytes() == b"keep me"
    bare = make_checkpoint("qwen2", tmp_path / "bare", vocab_size=ROWS)
    assert_user_error(run_kdtune("convert", "to-gguf", bare, tmp_path / "x.gguf"), "tokenizer.json: missing")
    # a sentencepiece-style tokenizer (no byte-level pre-tokenization): llama.cpp's other vocabulary type
    spm = json.loads((folder / "tokenizer.json").read_text())
    spm["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (bare / "tokenizer.json").write_text(json.dumps(spm))
    assert_user_error(run_kdtune("convert", "to-gguf", bare, tmp_path / "x.gguf"), "byte-level")
    # a pre-tokenizer none of llama.cpp's known ones reproduces
    odd = json.loads((folder / "tokenizer.json").read_text())
    odd["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "e"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (bare / "tokenizer.json").write_text(json.dumps(odd))
    assert_user_error(run_kdtune("convert", "to-gguf", bare, tmp_path / "x.gguf"), "splits text unlike")
    assert_user_error(run_kdtune("convert", "to-gguf", folder, tmp_path / "no" / "x.gguf"), "no such folder")
    assert not (tmp_path / "x.gguf").exists()


def test_qwen25s_real_tokenizer_goes_out_as_qwen2(tmp_path):
    """The real Qwen2.5 tokenizer (151,665 ids in 151,936 rows) is written under llama.cpp's
    'qwen2' pre-tokenizer, its added tokens as control tokens, and comes back encoding alike."""
    from kdtune.checkpointing import write_random_checkpoint
    from tests.models.tiny import qwen_tokenizer_config

    folder = tmp_path / "qwen"
    write_random_checkpoint(qwen_tokenizer_config(hidden_size=32, intermediate_size=32), folder, seed=0)
    for f in (ASSETS / "qwen2_5_tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    path = to_gguf(folder, tmp_path / "qwen.gguf", "q8_0")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 151936 and tokens[151643] == "<|endoftext|>" and types[151643] == 3
    assert types[-1] == 5 and np.all(np.array(types[:151643]) == 1)
    back = from_gguf(path, tmp_path / "back")
    ours, theirs = kdtune.load_tokenizer(back), kdtune.load_tokenizer(folder)
    for text in TEXTS + ["def f(x):\n    return x  # 12345678\r\n", "I'm  THERE'S   they'll"]:
        assert ours.encode(text) == theirs.encode(text), text


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of words, digits, whitespace runs, accents, CJK, emoji and dashes (byte fallback)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz ABC 0123456789 .,!?'\n\t éßø東京🙂Ω–—\"()"
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(alphabet), size=int(rng.integers(1, 60)))) for _ in range(n)]


def mistral_checkpoint(folder):
    """A small Mistral with the real Mistral v0.3 sentencepiece vocabulary (32,768 pieces)."""
    from kdtune.checkpointing import write_random_checkpoint

    config = {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 32768,
              "max_position_embeddings": 256, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e6,
              "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2}
    write_random_checkpoint(config, folder, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "mistral_v3_tokenizer" / name, folder / name)
    return folder


def test_a_sentencepiece_vocabulary_goes_out_as_llamas_and_tokenizes_as_sentencepiece(tmp_path):
    """Mistral v0.3's real vocabulary is written as llama.cpp's 'llama' tokenizer (pieces, scores,
    types, space prefix) and, read back, encodes as sentencepiece itself does with the original
    tokenizer.model; transformers' GGUF loader agrees on texts that do not start with a space."""
    sentencepiece = pytest.importorskip("sentencepiece")
    path = to_gguf(mistral_checkpoint(tmp_path / "mistral"), tmp_path / "mistral.gguf", "q8_0")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.pre" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:4] == [2, 3, 3, 3]  # [INST] and its kind: control
    assert tokens[771] == "<0x00>" and types[771] == types[1026] == 6 and types[1027] == 1 and scores[2000] < 0
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False

    engine = sentencepiece.SentencePieceProcessor(model_file=str(ASSETS / "mistral_v3_tokenizer" / "tokenizer.model"))
    back = kdtune.load_tokenizer(from_gguf(path, tmp_path / "back"))
    texts = TEXTS + random_texts(300) + ["  two leading spaces", " one", "", "a"]
    for text in texts:
        assert back.encode(text, add_special_tokens=False) == engine.encode(text), text
    assert back.encode("Hello world") == [1, *engine.encode("Hello world")]

    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (t.lstrip() for t in texts):  # transformers does not prefix a text that starts with a space
        assert theirs.encode(text, add_special_tokens=False) == engine.encode(text), text


def test_a_sentencepiece_vocabulary_llama_cpp_would_rebuild_differently_is_refused(tmp_path):
    folder = mistral_checkpoint(tmp_path / "mistral")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, spec["normalizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "x.gguf"
    assert_user_error(run_kdtune("convert", "to-gguf", folder, out), "sentencepiece-style vocabulary",
                      "no GGUF file was written")
    assert not out.exists()


def test_a_sentencepiece_vocabulary_without_the_space_prefix_goes_out_so(tmp_path):
    """Gemma-style: spaces become ▁ but none is put before the text (add_space_prefix false)."""
    folder = mistral_checkpoint(tmp_path / "mistral")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    path = to_gguf(folder, tmp_path / "gemma_style.gguf", "f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_space_prefix"].contents() is False
    back, original = kdtune.load_tokenizer(from_gguf(path, tmp_path / "back")), kdtune.load_tokenizer(folder)
    for text in TEXTS + random_texts(100, seed=1):
        assert back.encode(text) == original.encode(text), text
