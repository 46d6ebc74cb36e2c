"""A tiny random Qwen2 checkpoint carrying the real Qwen2.5 tokenizer, and local lm-eval tasks."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdtune.checkpointing import ADAPTER_SUBDIR, HFCheckpointer, load_model, save_peft_adapter, write_random_checkpoint
from kdtune.modules.lora import apply_lora, lora_modules, merge_lora_state_dict
from tests.models.tiny import qwen_tokenizer_config

QWEN_TOKENIZER = Path(__file__).parents[1] / "assets" / "qwen2_5_tokenizer"
# Peaked next-token distributions, so greedy choices are clear-cut.
TINY_QWEN2 = qwen_tokenizer_config(rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.5,
                                   eos_token_id=151645)


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory):
    """Nothing may reach the network (here and in the recipes these tests start); the datasets
    cache lives in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory) -> Path:
    out = write_random_checkpoint(TINY_QWEN2, tmp_path_factory.mktemp("tiny_qwen2"), seed=0)
    for file in QWEN_TOKENIZER.glob("*.json"):
        shutil.copy(file, out / file.name)
    shutil.copy(QWEN_TOKENIZER / "merges.txt", out / "merges.txt")
    return out


def write_tasks(folder: Path) -> Path:
    """Two local tasks on JSON-lines files: ``tiny_choice`` (multiple choice, accuracy) and
    ``tiny_sums`` (generate_until, exact match). Absolute ``data_files`` paths, so no download."""
    folder.mkdir(parents=True, exist_ok=True)
    choice_rows = [
        {"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a + b + 10)], "label": 0}
        for a, b in [(2, 3), (4, 4), (1, 7), (6, 2), (3, 3), (5, 4)]
    ]
    sum_rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 5), (7, 1), (2, 9)]]
    for name, rows in (("choice", choice_rows), ("sums", sum_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_choice.yaml").write_text(
        f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
    )
    (folder / "tiny_sums.yaml").write_text(
        f"""task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "sums.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return folder


@pytest.fixture(scope="session")
def lora_step(qwen_checkpoint, tmp_path_factory) -> Path:
    """A LoRA run's step folder on ``qwen_checkpoint``: merged weights plus ``adapter/`` (PEFT),
    with nonzero adapters on attention, MLP and the output layer."""
    model = load_model(qwen_checkpoint)
    apply_lora(model, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
               lora_rank=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # both factors drawn here, so the fixture does not depend on test order
        for module in lora_modules(model).values():
            module.lora_a.weight.normal_(0.0, 0.2, generator=gen)
            module.lora_b.weight.normal_(0.0, 0.2, generator=gen)
    checkpointer = HFCheckpointer(qwen_checkpoint, tmp_path_factory.mktemp("lora_run"))
    return checkpointer.save(
        merge_lora_state_dict(model),
        step=1,
        write_extra=lambda folder: save_peft_adapter(model, folder / ADAPTER_SUBDIR),
    )
