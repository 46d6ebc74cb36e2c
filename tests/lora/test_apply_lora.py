import pytest
import torch
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.modules.lora import LoRALinear, apply_lora, lora_modules, lora_state_dict, merge_lora_state_dict


def test_wraps_exactly_the_chosen_layers(tiny_decoder):
    model = apply_lora(tiny_decoder(), lora_attn_modules=["q_proj", "o_proj"], apply_lora_to_mlp=True,
                       apply_lora_to_output=True, lora_rank=4, lora_alpha=8)
    assert sorted(lora_modules(model)) == sorted(
        [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
        + [f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
        + ["lm_head"]
    )
    assert isinstance(model.layers[0].self_attn.k_proj, nn.Linear)


def test_defaults_adapt_q_and_v_and_leave_outputs_unchanged(tiny_decoder):
    tokens = torch.randint(0, 48, (2, 7))
    reference = tiny_decoder()(tokens)
    model = apply_lora(tiny_decoder())
    assert sorted(lora_modules(model)) == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert {m.rank for m in lora_modules(model).values()} == {8}
    torch.testing.assert_close(model(tokens), reference, rtol=0, atol=0)


def test_only_adapters_train_and_only_they_get_gradients(tiny_decoder, randomize_lora_b):
    model = apply_lora(tiny_decoder(), apply_lora_to_mlp=True, apply_lora_to_output=True, lora_rank=2)
    randomize_lora_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    model(torch.randint(0, 48, (2, 5))).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert torch.count_nonzero(p.grad) > 0, name


def test_merged_state_dict_is_base_plus_scaled_update(tiny_decoder, randomize_lora_b):
    base = tiny_decoder()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, apply_lora_to_mlp=True, apply_lora_to_output=True, lora_rank=4, lora_alpha=2)
    randomize_lora_b(model)
    merged = merge_lora_state_dict(model)
    assert set(merged) == set(base_state)
    adapters = lora_state_dict(model)
    for key, value in base_state.items():
        module = key.removesuffix(".weight")
        if f"{module}.lora_a.weight" in adapters:
            a, b = adapters[f"{module}.lora_a.weight"], adapters[f"{module}.lora_b.weight"]
            expected = value + 0.5 * torch.einsum("or,ri->oi", b, a)
        else:
            expected = value
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6, msg=key)
        assert not merged[key].requires_grad

    plain = tiny_decoder(seed=5)
    plain.load_state_dict(merged)
    tokens = torch.randint(0, 48, (3, 6))
    torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_new_layers_keep_the_model_mode(tiny_decoder):
    model = apply_lora(tiny_decoder().eval(), lora_dropout=0.5)
    assert not any(m.training for m in model.modules())


def test_base_state_dict_loads_under_native_names(tiny_decoder):
    model = apply_lora(tiny_decoder(seed=1))
    source = tiny_decoder(seed=2)
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(lora_state_dict(model))
    tokens = torch.randint(0, 48, (2, 4))
    torch.testing.assert_close(model(tokens), source(tokens))


def test_quantize_base_quantizes_only_the_wrapped_layers(tiny_decoder, randomize_lora_b):
    from torchao.quantization import NF4Tensor

    base = tiny_decoder()
    model = apply_lora(tiny_decoder(), lora_attn_modules=["q_proj", "k_proj"], quantize_base=True, lora_rank=4)
    randomize_lora_b(model)
    nf4 = {n for n, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    assert nf4 == {f"layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj")}

    tokens = torch.randint(0, 48, (2, 6))
    logits = model(tokens)
    dequantized = tiny_decoder()
    dequantized.load_state_dict(merge_lora_state_dict(model))
    torch.testing.assert_close(logits, dequantized(tokens), rtol=1e-4, atol=1e-4)
    assert (logits - base(tokens)).abs().max() > 1e-3  # NF4 error plus adapters: not the fp32 model

    logits.logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(lora_state_dict(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_attn_modules": ["q_proj", "gate_proj"]}, r"lora_attn_modules: \['gate_proj'\].*'q_proj', 'k_proj'"),
        ({"lora_attn_modules": "q_proj"}, "lora_attn_modules: 'q_proj'"),
        ({"lora_rank": 0}, "lora_rank: .* 0"),
        ({"lora_alpha": -1}, "lora_alpha: .* -1"),
        ({"lora_dropout": 1.0}, r"lora_dropout: .* 1\.0"),
        ({"lora_attn_modules": []}, "select no layer"),
    ],
)
def test_bad_settings_are_user_errors(tiny_decoder, kwargs, message):
    with pytest.raises(KDTuneError, match=message):
        apply_lora(tiny_decoder(), **kwargs)


def test_tied_output_cannot_take_an_output_adapter(tiny_decoder):
    with pytest.raises(KDTuneError, match="apply_lora_to_output: .*ties"):
        apply_lora(tiny_decoder(tied=True), apply_lora_to_output=True)
    model = apply_lora(tiny_decoder(tied=True), apply_lora_to_mlp=True)
    assert all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    assert not model.embed_tokens.weight.requires_grad
