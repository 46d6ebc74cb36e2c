"""A tiny stand-in decoder whose module names mirror the native model's (and so Hugging Face's)."""

import pytest
import torch
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=True) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, h):
        return self.o_proj(self.q_proj(h) * torch.sigmoid(self.k_proj(h)) + self.v_proj(h))


class _MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, h):
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class _Layer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.self_attn, self.mlp = _Attention(dim), _MLP(dim)

    def forward(self, h):
        h = h + self.self_attn(h)
        return h + self.mlp(h)


class TinyDecoder(nn.Module):
    """Names as the contract says: embed_tokens, layers.{i}.self_attn.*, layers.{i}.mlp.*, norm, lm_head."""

    def __init__(self, vocab=48, dim=32, n_layers=2, tied=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_Layer(dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        if not tied:
            self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return self.lm_head(h) if hasattr(self, "lm_head") else h @ self.embed_tokens.weight.T


@pytest.fixture
def tiny_decoder():
    """Factory: a seeded TinyDecoder."""

    def make(seed=0, **kwargs):
        torch.manual_seed(seed)
        return TinyDecoder(**kwargs)

    return make


def _randomize_lora_b(model, seed=1):
    from kdtune.modules.lora import lora_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            w = module.lora_b.weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.1)


@pytest.fixture
def randomize_lora_b():
    """Function giving every adapter of a model a nonzero B, so the adapters change the outputs."""
    return _randomize_lora_b
