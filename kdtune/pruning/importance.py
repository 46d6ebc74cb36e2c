"""How much each part of a trained decoder matters, measured on calibration data.

One pass with forward hooks gathers, over every real (non-padding) token (float32 sums per batch,
accumulated in float64):

- **Block Influence** of each layer (ShortGPT, Men et al. 2024): ``1 - cos(h_in, h_out)``, the
  cosine between the residual stream entering and leaving the layer, averaged over tokens. A layer
  that barely turns the hidden state scores near 0.
- **Activation importance** (Minitron, Muralidharan et al. 2024): the mean absolute activation of
  each MLP channel (the input of ``down_proj``), the mean L2 norm of each attention head's output
  (the input of ``o_proj``, one head_dim slice per head), and the mean absolute value of each
  hidden channel after every RMSNorm (both norms of every layer and the final one).

``skip_loss`` adds one pass per layer: the language-modeling loss with that layer left out, minus
the loss of the whole model (how much worse the model gets without it).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdtune.errors import KDTuneError
from kdtune.models import TransformerDecoder


@dataclass
class Importance:
    """Scores of a model's parts, float64 on the CPU; larger means more important."""

    block_influence: torch.Tensor  # [layers]
    heads: torch.Tensor  # [layers, heads]: mean L2 norm of each head's output
    channels: torch.Tensor  # [layers, intermediate]: mean |activation| of each MLP channel
    hidden: torch.Tensor  # [hidden]: mean |normalized hidden state| per channel
    tokens: int
    base_loss: float  # the whole model's language-modeling loss on the calibration tokens
    skip_loss: torch.Tensor | None = None  # [layers]: loss without the layer minus base_loss

    def kv_groups(self, num_kv_heads: int) -> torch.Tensor:
        """``[layers, kv_heads]``: each key/value group's summed head importance (the heads of group
        ``g`` are ``g * r ... g * r + r - 1``, ``r = heads / kv_heads``, as attention shares them)."""
        layers, heads = self.heads.shape
        return self.heads.reshape(layers, num_kv_heads, heads // num_kv_heads).sum(-1)


def calibration_batches(dataset, *, num_samples: int, batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens ``[B, S]`` right-padded, real-token mask ``[B, S]``) batches of the first
    ``num_samples`` samples' token ids."""
    if getattr(dataset, "_packs", None) is not None:
        raise KDTuneError("dataset: calibration takes unpacked samples; set dataset.packed: false")
    samples = [dataset[i]["tokens"] for i in range(min(num_samples, len(dataset)))]
    if sum(len(s) for s in samples) == 0:
        raise KDTuneError("dataset: the calibration samples hold no tokens")
    batches = []
    for first in range(0, len(samples), batch_size):
        rows = samples[first: first + batch_size]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
        batches.append((tokens, torch.arange(width)[None, :] < lengths[:, None]))
    return batches


def _lm_loss(logits: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over real positions whose next token is real, and their count."""
    target = real[:, 1:]
    loss = F.cross_entropy(logits[:, :-1][target].float(), tokens[:, 1:][target], reduction="sum")
    return float(loss), int(target.sum())


@torch.no_grad()
def measure_importance(model: TransformerDecoder, batches, *, device, skip_loss: bool = False,
                       progress: bool = True) -> Importance:
    """Every score above for ``model`` (left in eval mode) on ``batches`` from `calibration_batches`."""
    model.eval()
    args = model.args
    totals = {"bi": torch.zeros(args.num_layers, dtype=torch.float64),
              "heads": torch.zeros(args.num_layers, args.num_heads, dtype=torch.float64),
              "channels": torch.zeros(args.num_layers, args.intermediate_size, dtype=torch.float64),
              "hidden": torch.zeros(args.hidden_size, dtype=torch.float64)}
    current = {}  # the batch's real-token mask, for the hooks
    norms = 0

    def on_layer(i):
        def hook(module, inputs, output):
            cos = F.cosine_similarity(inputs[0][current["real"]].float(), output[current["real"]].float(), dim=-1)
            totals["bi"][i] += (1 - cos).sum().double().cpu()
        return hook

    def on_o_proj(i):
        def hook(module, inputs, output):
            per_head = inputs[0][current["real"]].float().unflatten(-1, (args.num_heads, args.head_dim))
            totals["heads"][i] += per_head.norm(dim=-1).sum(0).double().cpu()
        return hook

    def on_down_proj(i):
        def hook(module, inputs, output):
            totals["channels"][i] += inputs[0][current["real"]].float().abs().sum(0).double().cpu()
        return hook

    def on_norm(module, inputs, output):
        totals["hidden"] += output[current["real"]].float().abs().sum(0).double().cpu()

    handles = []
    for i, layer in enumerate(model.layers):
        handles += [layer.register_forward_hook(on_layer(i)),
                    layer.self_attn.o_proj.register_forward_hook(on_o_proj(i)),
                    layer.mlp.down_proj.register_forward_hook(on_down_proj(i))]
        # the normed inputs of attention and MLP (Gemma's post_attention_layernorm norms attention's output)
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)
        for norm in (layer.input_layernorm, mlp_norm):
            handles.append(norm.register_forward_hook(on_norm))
            norms += 1
    handles.append(model.norm.register_forward_hook(on_norm))
    norms += 1
    tokens_seen, loss_sum, loss_count = 0, 0.0, 0
    try:
        for tokens, real in tqdm(batches, desc="importance", disable=None if progress else True):
            tokens, real = tokens.to(device), real.to(device)
            current["real"] = real
            loss, count = _lm_loss(model(tokens), tokens, real)
            loss_sum, loss_count, tokens_seen = loss_sum + loss, loss_count + count, tokens_seen + int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    if loss_count == 0:
        raise KDTuneError("dataset: the calibration samples are too short to predict any next token")
    base = loss_sum / loss_count
    result = Importance(block_influence=totals["bi"] / tokens_seen, heads=totals["heads"] / tokens_seen,
                        channels=totals["channels"] / tokens_seen, hidden=totals["hidden"] / (tokens_seen * norms),
                        tokens=tokens_seen, base_loss=base)
    if skip_loss:
        result.skip_loss = torch.tensor([_loss_without(model, i, batches, device) - base
                                         for i in tqdm(range(args.num_layers), desc="skip-layer loss",
                                                       disable=None if progress else True)], dtype=torch.float64)
    return result


def _loss_without(model: TransformerDecoder, skipped: int, batches, device) -> float:
    """The language-modeling loss with layer ``skipped`` left out of the forward."""
    layers = model.layers
    model.layers = nn.ModuleList(layer for i, layer in enumerate(layers) if i != skipped)
    try:
        total = count = 0
        for tokens, real in batches:
            tokens, real = tokens.to(device), real.to(device)
            loss, n = _lm_loss(model(tokens), tokens, real)
            total, count = total + loss, count + n
    finally:
        model.layers = layers
    return total / count
