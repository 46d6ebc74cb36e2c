"""PEFT-format adapters against the reference: ``peft`` loading kdtune's files, kdtune loading peft's.

The kdtune side is a native-named view over a Hugging Face model's own submodules, so these tests
need no kdtune model; test_lora_models.py repeats the check with kdtune's decoder.
"""

import json

import pytest
import torch
from torch import nn

from kdtune.checkpointing.peft import load_peft_adapter, read_peft_config, save_peft_adapter
from kdtune.errors import KDTuneError
from kdtune.modules.lora import apply_lora, lora_modules, lora_state_dict, merge_lora_state_dict

transformers = pytest.importorskip("transformers", reason="transformers is the reference for HF checkpoints")
peft = pytest.importorskip("peft", reason="peft is the reference for the adapter format")

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


class NativeView(nn.Module):
    """The HF model's submodules under native names; ``sync`` puts a replaced lm_head back into it."""

    def __init__(self, hf):
        super().__init__()
        self.hf = [hf]  # a list: not a submodule, so not part of the view's names
        self.embed_tokens, self.layers, self.norm = hf.model.embed_tokens, hf.model.layers, hf.model.norm
        if not hf.config.tie_word_embeddings:
            self.lm_head = hf.lm_head

    def sync(self):
        if hasattr(self, "lm_head"):
            self.hf[0].lm_head = self.lm_head
        return self


def _config(family, tied):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


@pytest.fixture(scope="module", params=[("qwen2", False), ("llama", True)], ids=["qwen2-untied", "llama-tied"])
def base_dir(request, tmp_path_factory):
    family, tied = request.param
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, tied))
    path = tmp_path_factory.mktemp(f"{family}_base")
    model.save_pretrained(path)
    return path


def _hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _lora_settings(hf):
    return dict(lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True,
                apply_lora_to_output=not hf.config.tie_word_embeddings, lora_rank=4, lora_alpha=8,
                lora_dropout=0.05)


def _logits(hf, tokens):
    with torch.no_grad():
        return hf(input_ids=tokens).logits


TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def test_peft_loads_kdtune_adapter_with_the_same_logits(base_dir, tmp_path, randomize_lora_b):
    ours = _hf(base_dir)
    apply_lora(NativeView(ours), **_lora_settings(ours)).sync()
    randomize_lora_b(ours)
    save_peft_adapter(NativeView(ours), tmp_path, base_model_name_or_path=str(base_dir))

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["base_model_name_or_path"] == str(base_dir)
    expected_targets = ALL_ATTN + ["gate_proj", "up_proj", "down_proj"] + ["lm_head"] * (not ours.config.tie_word_embeddings)
    assert sorted(config["target_modules"]) == sorted(expected_targets)

    reference = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path).eval()
    peft_logits = _logits(reference, TOKENS)
    assert (peft_logits - _logits(_hf(base_dir), TOKENS)).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(_logits(ours, TOKENS), peft_logits, rtol=1e-5, atol=1e-5)

    merged = _hf(base_dir)
    NativeView(merged).load_state_dict(merge_lora_state_dict(NativeView(ours)))
    torch.testing.assert_close(_logits(merged, TOKENS), peft_logits, rtol=1e-5, atol=1e-5)


def test_kdtune_loads_peft_adapter_with_the_same_logits(base_dir, tmp_path):
    hf = _hf(base_dir)
    targets = ALL_ATTN[:3] + ["gate_proj", "up_proj", "down_proj"] + ["lm_head"] * (not hf.config.tie_word_embeddings)
    lora_config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets, task_type="CAUSAL_LM",
                                  init_lora_weights=False)
    torch.manual_seed(1)
    reference = peft.get_peft_model(hf, lora_config).eval()
    reference.save_pretrained(tmp_path)

    ours = _hf(base_dir)
    load_peft_adapter(NativeView(ours), tmp_path).sync()
    assert {m.alpha for m in lora_modules(NativeView(ours)).values()} == {5}
    torch.testing.assert_close(_logits(ours, TOKENS), _logits(reference, TOKENS), rtol=1e-5, atol=1e-5)


def test_roundtrip_into_a_model_that_already_has_lora(base_dir, tmp_path, randomize_lora_b):
    source = _hf(base_dir)
    apply_lora(NativeView(source), **_lora_settings(source)).sync()
    randomize_lora_b(source)
    save_peft_adapter(NativeView(source), tmp_path)

    target = _hf(base_dir)
    view = apply_lora(NativeView(target), **_lora_settings(target))
    load_peft_adapter(view, tmp_path)
    for key, value in lora_state_dict(NativeView(source)).items():
        torch.testing.assert_close(lora_state_dict(view)[key], value, rtol=0, atol=0)

    other_alpha = _hf(base_dir)
    view = apply_lora(NativeView(other_alpha), **{**_lora_settings(other_alpha), "lora_alpha": 3})
    with pytest.raises(KDTuneError, match="lora_alpha = 8"):
        load_peft_adapter(view, tmp_path)

    fewer = _hf(base_dir)
    with pytest.raises(KDTuneError, match="adapter_model.safetensors: adapter keys do not match"):
        load_peft_adapter(apply_lora(NativeView(fewer), lora_rank=4, lora_alpha=8), tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora = True is not supported"),
        ({"bias": "all"}, "bias = 'all' is not supported"),
        ({"peft_type": "IA3"}, "peft_type = 'IA3'"),
        ({"target_modules": "q_proj|v_proj"}, "target_modules = 'q_proj|v_proj'"),
        ({"target_modules": ["q_proj", "up_proj"]}, "adapts part of the MLP"),
        ({"target_modules": ["q_proj", "c_attn"]}, "must be a list drawn from"),
    ],
)
def test_unsupported_adapter_configs_are_user_errors(tmp_path, change, message):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **change}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(KDTuneError, match=message) as info:
        read_peft_config(tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_missing_adapter_is_a_user_error(tmp_path):
    with pytest.raises(KDTuneError, match="adapter_config.json: not found"):
        read_peft_config(tmp_path)
