"""LoRA on kdtune's decoder end to end: random HF checkpoint -> native model -> adapters -> saved
step folder, checked against transformers + peft loading the same files."""

import pytest
import torch

from kdtune.checkpointing import HFCheckpointer, load_model, write_random_checkpoint
from kdtune.checkpointing.peft import ADAPTER_SUBDIR, load_peft_adapter, save_peft_adapter
from kdtune.errors import KDTuneError
from kdtune.modules.lora import apply_lora, lora_modules, lora_state_dict, merge_lora_state_dict
from tests.models.tiny import make_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is the reference for HF checkpoints")
peft = pytest.importorskip("peft", reason="peft is the reference for the adapter format")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


FAMILIES = ["mistral", "phi3", "gemma2", "gemma3_text"]  # tests/models/tiny.py's configs of these families


@pytest.fixture(scope="module", params=["qwen2", "llama", *FAMILIES],
                ids=["qwen2-untied", "llama-tied", *FAMILIES])
def base_dir(request, tmp_path_factory):
    if request.param in FAMILIES:
        return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    config = dict(COMMON, model_type=request.param, tie_word_embeddings=request.param == "llama")
    return write_random_checkpoint(config, tmp_path_factory.mktemp(request.param), seed=3)


def _lora_model(base_dir, randomize_lora_b, **overrides):
    model = load_model(base_dir)
    settings = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True,
                    apply_lora_to_output=not model.args.tie_word_embeddings, lora_rank=4, lora_alpha=8)
    apply_lora(model, **{**settings, **overrides})
    randomize_lora_b(model)
    return model


def _hf_logits(model_dir, adapter_dir=None):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        hf = peft.PeftModel.from_pretrained(hf, adapter_dir)
    with torch.no_grad():
        return hf.eval()(input_ids=TOKENS).logits


def test_saved_step_loads_in_peft_and_transformers_with_the_same_logits(base_dir, tmp_path, randomize_lora_b):
    model = _lora_model(base_dir, randomize_lora_b)
    with torch.no_grad():
        logits = model(TOKENS)
    assert (logits - load_model(base_dir)(TOKENS)).abs().max() > 1e-3  # the adapters matter

    checkpointer = HFCheckpointer(base_dir, tmp_path)
    step = checkpointer.save(
        merge_lora_state_dict(model),
        step=1,
        write_extra=lambda folder: save_peft_adapter(
            model, folder / ADAPTER_SUBDIR, base_model_name_or_path=str(base_dir)
        ),
    )
    torch.testing.assert_close(_hf_logits(base_dir, step / ADAPTER_SUBDIR), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_hf_logits(step), logits, rtol=1e-5, atol=1e-5)  # merged weights, no adapter

    reloaded = load_peft_adapter(load_model(base_dir), step)  # finds step/adapter
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS), logits, rtol=1e-5, atol=1e-5)


def test_merged_weights_are_base_plus_scaled_update(base_dir, randomize_lora_b):
    base = load_model(base_dir).state_dict()
    model = _lora_model(base_dir, randomize_lora_b, lora_alpha=2)
    merged = merge_lora_state_dict(model)
    assert merged.keys() == base.keys()
    for name, module in lora_modules(model).items():
        a, b = module.lora_a.weight.detach(), module.lora_b.weight.detach()
        expected = base[f"{name}.weight"] + 0.5 * torch.einsum("or,ri->oi", b, a)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6, msg=name)


def test_training_step_touches_only_adapters(base_dir, randomize_lora_b):
    model = _lora_model(base_dir, randomize_lora_b).train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    model(TOKENS).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_state_dict(model))


def test_qlora_runs_on_cpu_and_matches_the_dequantized_model(base_dir, randomize_lora_b):
    from torchao.quantization import NF4Tensor

    model = _lora_model(base_dir, randomize_lora_b, quantize_base=True).train()
    assert all(isinstance(m.weight, NF4Tensor) for m in lora_modules(model).values())
    assert not isinstance(model.embed_tokens.weight, NF4Tensor)
    logits = model(TOKENS)

    dequantized = load_model(base_dir)
    dequantized.load_state_dict(merge_lora_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(logits, dequantized(TOKENS), rtol=1e-4, atol=1e-4)

    logits.logsumexp(-1).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(lora_state_dict(model))
    assert all(torch.isfinite(p.grad).all() for p in lora_state_dict(model).values())


def test_kdtune_loads_an_adapter_peft_trained_with_the_same_logits(base_dir, tmp_path):
    """The other direction: peft's own adapter on the HF model (its family's module names, Phi-3's
    fused qkv_proj and gate_up_proj included) gives the same logits on the native model."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    fused = hf.config.model_type == "phi3"
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if fused else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        expected = peft_model.eval()(input_ids=TOKENS).logits
    peft_model.save_pretrained(tmp_path)
    model = load_peft_adapter(load_model(base_dir), tmp_path)
    assert {name.rpartition(".")[2] for name in lora_modules(model)} == set(targets)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_part_of_a_fused_projection_is_refused(tmp_path):
    model = load_model(make_checkpoint("phi3", tmp_path))
    with pytest.raises(KDTuneError, match="names part of this model's fused qkv_proj"):
        apply_lora(model, lora_attn_modules=["q_proj", "v_proj"])
