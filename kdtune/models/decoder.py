"""One decoder-only transformer for the Llama 3, Qwen2/2.5/3, Mistral, Phi-3 and Gemma 2/3 families,
its variations switched by ``ModelArgs`` fields rather than subclasses.

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
from kdtune.modules.mlp import GatedMLP
from kdtune.modules.rmsnorm import RMSNorm
from kdtune.modules.rope import RotaryEmbedding
from kdtune.modules.softcap import softcap


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``.

    With ``sandwich_norms`` (Gemma) the outputs are normed too before they are added:
    ``h + post_attention_layernorm(attn(input_layernorm(h)))``, then
    ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`` (Hugging Face's names;
    in the other families ``post_attention_layernorm`` is the MLP's input norm).
    """

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        offset = args.norm_unit_offset

        def norm():
            return RMSNorm(args.hidden_size, args.norm_eps, unit_offset=offset)

        self.sliding = args.is_sliding(layer)
        self.input_layernorm = norm()
        self.self_attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.qkv_bias,
            o_bias=args.o_bias,
            qk_norm=args.qk_norm,
            norm_eps=args.norm_eps,
            unit_offset=offset,
            scale=args.attn_scale,
            logit_softcap=args.attn_logit_softcapping,
            fused_qkv=args.fused_projections,
        )
        self.post_attention_layernorm = norm()
        if args.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias, activation=args.hidden_act,
                            fused=args.fused_projections)

    def forward(self, h, cos, sin, mask):
        if hasattr(self, "pre_feedforward_layernorm"):
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
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
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps, unit_offset=args.norm_unit_offset)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        if args.local_rope_theta is not None:  # Gemma 3's sliding layers: their own base and scaling
            self.local_rope = RotaryEmbedding(args.head_dim, args.local_rope_theta, args.local_rope_scaling)
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
            Logits ``[B, S, V]`` in the weights' dtype (softcapped when the model caps them), a list of chunks of them when
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
        if self.args.embed_scale is not None:  # rounded to the weights' dtype, as the checkpoints were trained
            h = h * torch.tensor(self.args.embed_scale, dtype=h.dtype)
        rope = self.rope(input_pos, h.dtype)
        local_rope = self.local_rope(input_pos, h.dtype) if hasattr(self, "local_rope") else rope
        window_mask = self._window_mask(mask, start, s, b, tokens.device) if self.args.sliding_window else None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        wanted = {i: None for i in return_layers or ()}
        bad = [i for i in wanted if not -1 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"return_layers: {bad[0]} is not a layer of this {len(self.layers)}-layer model")
        if -1 in wanted:
            wanted[-1] = h
        for i, layer in enumerate(self.layers):
            cos, sin = local_rope if layer.sliding else rope
            layer_mask = window_mask if layer.sliding else mask
            if recompute:
                h = checkpoint(layer, h, cos, sin, layer_mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, layer_mask)
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

    def _window_mask(self, mask, start: int, s: int, b: int, device) -> torch.Tensor | None:
        """The sliding layers' mask: ``mask`` (None: causal) and, where a query would reach further back
        than ``sliding_window`` slots, not there. Slot distance is position distance within a row
        (packed samples and cached rows are contiguous), so this is transformers' window. ``mask``
        itself when no query reaches that far."""
        window = self.args.sliding_window
        if start + s <= window:
            return mask
        queries = start + torch.arange(s, device=device)
        slots = torch.arange(start + s, device=device)
        near = (queries[:, None] - slots) < window
        if mask is None:  # causal over the slots
            mask = slots <= queries[:, None]
        return (mask & near).expand(b, s, start + s)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        # Through the module when untied, so an adapter wrapped around lm_head takes part.
        logits = F.linear(h, self.embed_tokens.weight) if self.args.tie_word_embeddings else self.lm_head(h)
        return softcap(logits, self.args.final_logit_softcapping)
