"""The generate recipe through `kdtune run` on a tiny checkpoint with the real Qwen2.5 tokenizer."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdtune.checkpointing import load_model, load_peft_adapter, save_peft_adapter, write_random_checkpoint
from kdtune.generation import generate
from kdtune.modules.lora import apply_lora, lora_modules
from kdtune.tokenization import load_tokenizer
from tests.cli_utils import assert_user_error, run_kdtune
from tests.models.tiny import qwen_tokenizer_config

QWEN = Path(__file__).parents[1] / "assets" / "qwen2_5_tokenizer"
TINY_QWEN2_5 = qwen_tokenizer_config(rope_theta=1000000.0, initializer_range=0.3)
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_recipe")
    ckpt = write_random_checkpoint(TINY_QWEN2_5, root / "tiny", seed=0)
    for file in QWEN.glob("*.json"):
        shutil.copy(file, ckpt / file.name)
    model = load_model(ckpt)
    apply_lora(model, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(1)
    for module in lora_modules(model).values():
        module.lora_b.weight.data = torch.randn(module.lora_b.weight.shape, generator=gen)
    save_peft_adapter(model, root / "adapter")
    return ckpt, root / "adapter"


def expected_completions(ckpt, prompts, adapter=None, **sampling):
    tok = load_tokenizer(ckpt)
    model = load_model(ckpt)
    if adapter:
        load_peft_adapter(model, adapter)
    return generate(model, prompts, stop_ids=tok.eos_ids, pad_id=tok.pad_id, vocab_size=tok.vocab_size,
                    **sampling).completions


def test_prompt_greedy(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    proc = run_kdtune("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={ckpt}",
                      f"output_dir={tmp_path}", "prompt=Once upon a time", "max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "generations.json").read_text())
    tok = load_tokenizer(ckpt)
    want = expected_completions(ckpt, [tok.encode("Once upon a time")], max_new_tokens=6)
    assert [r["completion_ids"] for r in records] == want and records[0]["prompt"] == "Once upon a time"
    assert "--- completion 0 ---" in proc.stdout and records[0]["completion"] in proc.stdout


def test_chats_sampled_with_an_adapter(checkpoint, tmp_path):
    ckpt, adapter = checkpoint
    messages = json.dumps(CHATS)
    proc = run_kdtune("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={ckpt}",
                      f"adapter_dir={adapter}", f"output_dir={tmp_path}", "prompt=null", f"messages={messages}",
                      "max_new_tokens=5", "temperature=0.9", "top_p=0.9", "seed=7")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "generations.json").read_text())
    tok = load_tokenizer(ckpt)
    prompts = [tok.apply_chat_template(chat, add_generation_prompt=True) for chat in CHATS]
    want = expected_completions(ckpt, prompts, adapter, max_new_tokens=5, temperature=0.9, top_p=0.9,
                                generator=torch.Generator().manual_seed(7))
    assert [r["completion_ids"] for r in records] == want
    assert [r["prompt"] for r in records] == CHATS
    assert want != expected_completions(ckpt, prompts, None, max_new_tokens=5, temperature=0.9, top_p=0.9,
                                         generator=torch.Generator().manual_seed(7))


def test_prompt_and_messages_are_exclusive(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    proc = run_kdtune("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={ckpt}",
                      f"output_dir={tmp_path}", "prompt=null")
    assert_user_error(proc, "prompt, messages")
    assert not (tmp_path / "generations.json").exists()


def test_messages_file_in_batches_writes_completed_chats(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    rows = [{"messages": chat + [{"role": "assistant", "content": "a reference answer"}]} for chat in CHATS * 2]
    rows.append({"messages": CHATS[0]})  # a prompt without a reply
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_kdtune("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={ckpt}",
                      f"output_dir={tmp_path / 'out'}", "prompt=null", f"messages_file={data}", "batch_size=2",
                      "max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(ckpt)
    chats = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in rows]
    # Batches of 2 give what one batch of everything gives: greedy decoding is per row.
    want = expected_completions(ckpt, [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats],
                                max_new_tokens=4)
    completed = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [c["messages"][:-1] for c in completed] == chats
    for chat, ids in zip(completed, want):
        reply = chat["messages"][-1]
        assert reply["role"] == "assistant"
        assert reply["content"] == tok.decode(ids[:-1] if ids[-1] in tok.eos_ids else ids)
