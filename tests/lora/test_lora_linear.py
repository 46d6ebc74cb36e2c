import math

import pytest
import torch
from torch import nn

from kdtune.errors import KDTuneError
from kdtune.modules.lora import LoRALinear, quantize_nf4


def _randomized(layer, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=gen))
    return layer


def test_starts_as_the_base_layer():
    torch.manual_seed(0)
    layer = LoRALinear(12, 20, rank=4, alpha=8, bias=True)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, rtol=0, atol=0)
    assert layer.scaling == 2.0
    assert layer.lora_a.weight.shape == (4, 12) and layer.lora_b.weight.shape == (20, 4)
    assert torch.count_nonzero(layer.lora_a.weight) > 0 and torch.count_nonzero(layer.lora_b.weight) == 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert layer.lora_a.weight.abs().max() <= bound


def test_forward_and_merged_weight_match_the_lora_formula():
    torch.manual_seed(0)
    layer = _randomized(LoRALinear(12, 20, rank=4, alpha=6, bias=True))
    w, b = layer.weight, layer.bias
    a, bb = layer.lora_a.weight, layer.lora_b.weight
    x = torch.randn(3, 12)
    expected = x @ w.T + b + 1.5 * (x @ a.T) @ bb.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), w + 1.5 * bb @ a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x @ layer.merged_weight().T + b, expected, rtol=1e-5, atol=1e-5)


def test_from_linear_takes_over_the_weight_without_copying():
    linear = nn.Linear(8, 16, bias=True)
    layer = LoRALinear.from_linear(linear, rank=2, alpha=4)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.bias.data_ptr() == linear.bias.data_ptr()
    assert not layer.weight.requires_grad and not layer.weight.is_meta and not layer.lora_a.weight.is_meta
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), linear(x))


def test_dropout_zero_is_deterministic_and_dropout_touches_only_the_adapter_path():
    torch.manual_seed(0)
    layer = _randomized(LoRALinear(12, 20, rank=4, alpha=8)).train()
    x = torch.randn(6, 12)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)

    noisy = LoRALinear(12, 20, rank=4, alpha=8, dropout=0.5).train()  # B = 0: adapter path is zero
    torch.testing.assert_close(noisy(x), x @ noisy.weight.T, rtol=0, atol=0)
    _randomized(noisy)
    assert not torch.equal(noisy(x), noisy(x))  # train mode: dropout on the adapter input
    noisy.eval()
    torch.testing.assert_close(noisy(x), x @ noisy.merged_weight().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (20, 48), (128, 256)])
def test_qlora_base_is_nf4_and_matches_the_dequantized_layer(shape):
    from torchao.quantization import NF4Tensor

    out_dim, in_dim = shape
    torch.manual_seed(0)
    layer = _randomized(LoRALinear(in_dim, out_dim, rank=4, alpha=8, bias=True, quantize_base=True))
    assert isinstance(layer.weight, NF4Tensor)
    dequant = layer.weight.get_original_weight()
    x = torch.randn(2, 3, in_dim, requires_grad=True)
    out = layer(x)
    reference = x @ dequant.T + layer.bias + 2.0 * x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.merged_weight(), dequant + 2.0 * layer.lora_b.weight @ layer.lora_a.weight)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer.merged_weight().detach(), rtol=1e-5, atol=1e-4)
    assert layer.lora_a.weight.grad is not None and layer.lora_b.weight.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


def test_nf4_keeps_the_weight_close():
    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.02
    err = (quantize_nf4(w).get_original_weight() - w).abs()
    assert err.max() < 0.25 * w.abs().max()  # 4-bit levels: at most about half a level apart


def test_nf4_rejects_sizes_outside_its_blocks():
    with pytest.raises(KDTuneError, match="quantize_base.*shape \\[3, 7\\]"):
        LoRALinear(7, 3, rank=2, alpha=2, quantize_base=True)
