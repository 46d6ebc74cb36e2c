"""One decoder-only transformer for the Llama 3 and Qwen2/2.5/3 families.

Module names are Hugging Face's without the leading ``model.``, so a checkpoint's tensors map onto
this model by dropping that prefix and LoRA can target projections by their familiar names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdtune.models.args import ModelArgs
from kdtune.modules.attention import Attention
from kdtune.modules.kv_cache import KVCache
from kdtune.modules.mlp import SwiGLU
from kdtune.modules.rmsnorm import RMSNorm
from kdtune.modules.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.self_attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.qkv_bias,
            o_bias=args.o_bias,
            qk_norm=args.qk_norm,
            norm_eps=args.norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)

    def forward(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class TransformerDecoder(nn.Module):
    """Token ids in, next-token logits (or final hidden states) out.

    Options the checkpoint cannot know:
      ``num_output_chunks``: 0 returns one logits tensor; ``n >= 1`` returns a list of ``n`` logits
        chunks split along the sequence, so a chunked loss never holds all ``[B, S, V]`` at once.
      ``activation_checkpointing``: recompute each layer in backward instead of storing its
        activations (training only); also switchable later with ``enable_activation_checkpointing``.

    Generation: ``setup_caches`` allocates a KV cache per layer; see ``forward`` for how positions
    and masks work while it is active.
    """

    def __init__(self, args: ModelArgs, *, num_output_chunks: int = 0, activation_checkpointing: bool = False):
        super().__init__()
        self.args = args
        self.num_output_chunks = num_output_chunks
        self.activation_checkpointing = activation_checkpointing
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The ``[V, d]`` output projection: ``lm_head.weight``, or the embedding when tied.

        With a LoRA adapter on ``lm_head`` this is the merged (differentiable) weight, so fused
        losses that project chunk by chunk see the same output layer as ``forward``.
        """
        if self.args.tie_word_embeddings:
            return self.embed_tokens.weight
        merged = getattr(self.lm_head, "merged_weight", None)
        return merged() if merged is not None else self.lm_head.weight

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = enabled

    # --- KV cache -------------------------------------------------------------------------------

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate an empty KV cache of ``max_seq_len`` slots per row in every layer.

        ``dtype``/``device`` default to the embedding's. Replaces any cache already set up.
        """
        weight = self.embed_tokens.weight
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(
                batch_size,
                max_seq_len,
                attn.num_kv_heads,
                attn.head_dim,
                dtype or weight.dtype,
                device or weight.device,
            )

    def caches_are_enabled(self) -> bool:
        return self.layers[0].self_attn.kv_cache is not None

    def reset_caches(self) -> None:
        """Empty every cache (keeping its memory) before generating for a new batch."""
        for layer in self.layers:
            layer.self_attn.kv_cache.reset()

    def remove_caches(self) -> None:
        """Free the caches and return to ordinary (training / scoring) forwards."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_size(self) -> int:
        """Number of filled cache slots (0 without caches)."""
        cache = self.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.size

    # --- forward --------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        return_hidden: bool = False,
        return_layers: list[int] | tuple[int, ...] | None = None,
    ) -> torch.Tensor | list[torch.Tensor] | tuple:
        """Run the decoder on ``tokens`` ``[B, S]``.

        Args:
            mask: bool, True = may attend. Without caches ``[B, S, S]`` (e.g. block-causal for
                packed rows); None means causal. With caches ``[B, S, max_seq_len]`` over cache
                slots (slot ``j`` holds the ``j``-th token fed since the last reset); None means
                causal over slots. Every query row must allow at least one slot (let padding
                attend to itself): a row with none gives zeros on CPU and NaN on some GPU kernels.
            input_pos: RoPE position ids ``[B, S]``. Default ``arange(S)``, or with caches
                ``cache_size + arange(S)``. Packed rows restart at 0 per sample; left-padded
                generation gives each row its own positions.
            return_hidden: return the final-norm hidden states ``[B, S, d]`` instead of logits,
                for losses that project through ``output_weight`` chunk by chunk.
            return_layers: when given (a list, maybe empty), also return the residual stream after
                each of these decoder layers (0-based; ``-1`` is the embeddings) as a list in this
                order: ``(output, [h_i, ...])``. Only those are kept, with their autograd history.

        Returns:
            Logits ``[B, S, V]`` in the weights' dtype, a list of chunks of them when
            ``num_output_chunks >= 1``, or the hidden states. With caches the new tokens' keys
            and values are appended to the cache.
        """
        b, s = tokens.shape
        start = self.cache_size
        if input_pos is None:
            input_pos = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        if self.caches_are_enabled():
            if mask is None:
                slots = torch.arange(start + s, device=tokens.device)
                mask = (slots <= (start + torch.arange(s, device=tokens.device)).unsqueeze(1)).expand(b, s, -1)
            else:
                mask = mask[:, :, : start + s]
        h = self.embed_tokens(tokens)
        cos, sin = self.rope(input_pos, h.dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        wanted = {i: None for i in return_layers or ()}
        bad = [i for i in wanted if not -1 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"return_layers: {bad[0]} is not a layer of this {len(self.layers)}-layer model")
        if -1 in wanted:
            wanted[-1] = h
        for i, layer in enumerate(self.layers):
            if recompute:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask)
            if i in wanted:
                wanted[i] = h
        h = self.norm(h)
        if return_hidden:
            out = h
        elif self.num_output_chunks:
            out = [self._project(chunk) for chunk in h.chunk(self.num_output_chunks, dim=1)]
        else:
            out = self._project(h)
        return out if return_layers is None else (out, [wanted[i] for i in return_layers])

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        # Through the module when untied, so an adapter wrapped around lm_head takes part.
        return F.linear(h, self.embed_tokens.weight) if self.args.tie_word_embeddings else self.lm_head(h)
