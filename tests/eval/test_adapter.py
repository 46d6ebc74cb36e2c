"""Evaluating a base checkpoint plus a LoRA adapter gives what evaluating the merged weights gives."""

import pytest
import torch

pytest.importorskip("lm_eval", reason="evaluation needs the eval extra (lm-eval)")

from lm_eval.api.instance import Instance  # noqa: E402

from kdtune.checkpointing import load_model, load_peft_adapter  # noqa: E402
from kdtune.eval import KDTuneLM  # noqa: E402
from kdtune.tokenization import load_tokenizer  # noqa: E402

PAIRS = [("The capital of France is", " Paris"), ("", "Hello world"), ("Question: 3+4=", "7")]
PROMPTS = ["The capital of France is", "1+1="]


def _evaluate(model, tokenizer):
    lm = KDTuneLM(model, tokenizer, batch_size=2, max_length=64)
    scores = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)])
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("one two three " * 30,), 0)])
    texts = lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 6}), i) for i, p in enumerate(PROMPTS)])
    return [lp for lp, _ in scores] + rolling, [g for _, g in scores], texts


def test_base_plus_adapter_equals_merged_checkpoint(qwen_checkpoint, lora_step):
    tokenizer = load_tokenizer(qwen_checkpoint)
    merged = _evaluate(load_model(lora_step), tokenizer)
    adapted = _evaluate(load_peft_adapter(load_model(qwen_checkpoint), lora_step), tokenizer)
    base = _evaluate(load_model(qwen_checkpoint), tokenizer)

    torch.testing.assert_close(adapted[0], merged[0], rtol=1e-5, atol=1e-3)
    assert adapted[1:] == merged[1:]
    assert all(abs(a - b) > 1e-2 for a, b in zip(adapted[0], base[0]))  # the adapter matters
