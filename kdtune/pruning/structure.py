"""Structured pruning of a decoder: which layers, key/value groups, MLP channels and hidden
channels to keep, and the smaller checkpoint that keeps exactly those.

Attention is pruned by whole key/value groups (a key/value head with the query heads that share
it), so a GQA model stays a GQA model with the same number of query heads per group; ``head_dim``
never changes and is written into ``config.json`` explicitly. The same number of groups and MLP
channels is kept in every layer (a config has one size for all), each layer its own most important
ones. Hidden channels are kept alike everywhere: the embedding's columns, every projection's
input or output dimension, every norm's weight and the output head.
"""

import math
from dataclasses import dataclass

import torch

from kdtune.errors import KDTuneError
from kdtune.models.args import GEMMA, ModelArgs
from kdtune.pruning.importance import Importance


@dataclass
class PruningPlan:
    """What the pruned model keeps, in the original model's indices (ascending)."""

    layers: list[int]
    kv_groups: list[list[int]]  # per kept layer
    channels: list[list[int]]  # per kept layer
    hidden: list[int]


def check_targets(args: ModelArgs, *, num_layers_to_remove: int = 0, num_layers: int | None = None,
                  intermediate_size: int | None = None, num_attention_heads: int | None = None,
                  hidden_size: int | None = None) -> int:
    """The number of layers to remove; every target checked against the model before any weight loads."""
    if num_layers is not None and num_layers_to_remove:
        raise KDTuneError("num_layers, num_layers_to_remove: give one of them (the layers to keep, or to remove)")
    remove = args.num_layers - num_layers if num_layers is not None else num_layers_to_remove
    if not 0 <= remove < args.num_layers:
        raise KDTuneError(f"num_layers_to_remove: the model has {args.num_layers} layers; remove 0 to "
                          f"{args.num_layers - 1} of them (got {remove}: at least one layer must stay)")
    for key, value, limit in (("intermediate_size", intermediate_size, args.intermediate_size),
                              ("hidden_size", hidden_size, args.hidden_size)):
        if value is not None and not 1 <= value <= limit:
            raise KDTuneError(f"{key}: expected 1 to the model's {limit}, got {value}")
    widths = {"intermediate_size": (intermediate_size, args.intermediate_size),
              "num_attention_heads": (num_attention_heads, args.num_heads),
              "hidden_size": (hidden_size, args.hidden_size)}
    cut = [key for key, (value, current) in widths.items() if value not in (None, current)]
    if args.fused_projections and cut:
        raise KDTuneError(f"{cut[0]}: width pruning of {args.model_type}'s fused qkv_proj/gate_up_proj is not "
                          f"supported; remove layers only (num_layers_to_remove)")
    if num_attention_heads is not None:
        per_group = args.num_heads // args.num_kv_heads
        if not per_group <= num_attention_heads <= args.num_heads or num_attention_heads % per_group:
            raise KDTuneError(
                f"num_attention_heads: {num_attention_heads} breaks the model's grouped-query attention: its "
                f"{args.num_heads} query heads share {args.num_kv_heads} key/value heads, {per_group} to each, so "
                f"keep a multiple of {per_group} up to {args.num_heads}")
    return remove


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ascending (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def plan_pruning(importance: Importance, args: ModelArgs, *, remove: int, layer_importance: str = "block_influence",
                 contiguous: bool = False, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, hidden_size: int | None = None) -> PruningPlan:
    """Keep the most important parts: drop the ``remove`` layers of lowest ``layer_importance``
    (``block_influence`` or ``skip_loss``; with ``contiguous`` the block of ``remove`` adjacent
    layers of lowest total), and in width keep the groups and channels of highest importance."""
    scores = importance.block_influence if layer_importance == "block_influence" else importance.skip_loss
    if scores is None:
        raise ValueError("skip_loss importance was not measured")
    if contiguous and remove:
        start = min(range(args.num_layers - remove + 1), key=lambda i: (float(scores[i: i + remove].sum()), i))
        dropped = set(range(start, start + remove))
    else:
        dropped = set(range(args.num_layers)) - set(_top(scores, args.num_layers - remove))
    layers = [i for i in range(args.num_layers) if i not in dropped]
    groups = importance.kv_groups(args.num_kv_heads)
    keep_groups = args.num_kv_heads if num_attention_heads is None else \
        num_attention_heads // (args.num_heads // args.num_kv_heads)
    return PruningPlan(
        layers=layers,
        kv_groups=[_top(groups[i], keep_groups) for i in layers],
        channels=[_top(importance.channels[i], intermediate_size or args.intermediate_size) for i in layers],
        hidden=_top(importance.hidden, hidden_size or args.hidden_size),
    )


def pruned_args(args: ModelArgs, plan: PruningPlan) -> ModelArgs:
    per_group = args.num_heads // args.num_kv_heads
    groups = len(plan.kv_groups[0])
    types = None if args.layer_types is None else tuple(args.layer_types[i] for i in plan.layers)
    # Gemma scales its embeddings by sqrt(hidden_size): the pruned width's, as its config.json implies
    scale = None if args.embed_scale is None else math.sqrt(len(plan.hidden))
    return args.replace(num_layers=len(plan.layers), num_kv_heads=groups, num_heads=groups * per_group,
                        intermediate_size=len(plan.channels[0]), hidden_size=len(plan.hidden), layer_types=types,
                        embed_scale=scale)


def pruned_config(config: dict, args: ModelArgs, plan: PruningPlan) -> dict:
    """``config.json`` of the pruned model: the new sizes, ``head_dim`` explicit, per-layer lists cut."""
    new = pruned_args(args, plan)
    out = dict(config, num_hidden_layers=new.num_layers, num_attention_heads=new.num_heads,
               num_key_value_heads=new.num_kv_heads, intermediate_size=new.intermediate_size,
               hidden_size=new.hidden_size, head_dim=args.head_dim)
    if new.layer_types is not None and args.model_type in GEMMA:  # explicit, also for a pattern (Gemma 3's)
        out["layer_types"] = list(new.layer_types)
    if isinstance(config.get("max_window_layers"), int):
        out["max_window_layers"] = min(config["max_window_layers"], new.num_layers)
    return out


def prune_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, plan: PruningPlan) -> dict[str, torch.Tensor]:
    """The native state dict of the pruned model (new tensors; ``state`` is left as it was)."""
    hidden = torch.tensor(plan.hidden)
    per_group, hd = args.num_heads // args.num_kv_heads, args.head_dim

    def rows(heads: list[int]) -> torch.Tensor:  # the rows of these heads in a [heads * head_dim, ...] weight
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    out = {}
    for name, tensor in state.items():
        if not name.startswith("layers."):
            if name in ("embed_tokens.weight", "lm_head.weight"):
                out[name] = tensor[:, hidden].clone()
            elif name == "norm.weight":
                out[name] = tensor[hidden].clone()
            else:
                out[name] = tensor.clone()
    for new, (old, groups, channels) in enumerate(zip(plan.layers, plan.kv_groups, plan.channels)):
        q_heads = [g * per_group + j for g in groups for j in range(per_group)]
        q, kv, mlp = rows(q_heads), rows(groups), torch.tensor(channels)
        # (rows kept, columns kept) of each weight; a bias keeps the rows' selection.
        cut = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
               "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
               "mlp.down_proj": (hidden, mlp)}
        prefix = f"layers.{old}."
        for name, tensor in state.items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            module, _, kind = local.rpartition(".")
            if module in cut:
                keep_rows, keep_cols = cut[module]
                tensor = tensor[keep_rows][:, keep_cols] if kind == "weight" else tensor[keep_rows]
            elif module.endswith("layernorm"):  # Gemma's pre/post feed-forward norms too
                tensor = tensor[hidden]
            out[f"layers.{new}.{local}"] = tensor.clone()  # q_norm / k_norm act per head_dim: unchanged
    return out


def parameter_count(args: ModelArgs) -> int:
    from kdtune.models import TransformerDecoder

    with torch.device("meta"):
        return sum(p.numel() for p in TransformerDecoder(args).parameters())


def prune_report(importance: Importance, args: ModelArgs, plan: PruningPlan, settings: dict) -> dict:
    """What ``prune_report.json`` holds: every score, what was kept, and the sizes before and after."""
    new = pruned_args(args, plan)
    kept = set(plan.layers)
    layers = []
    for i in range(args.num_layers):
        entry = {"index": i, "block_influence": float(importance.block_influence[i]), "kept": i in kept}
        if importance.skip_loss is not None:
            entry["skip_loss_increase"] = float(importance.skip_loss[i])
        layers.append(entry)
    groups = importance.kv_groups(args.num_kv_heads)
    return {
        "settings": settings,
        "calibration": {"tokens": importance.tokens, "loss": importance.base_loss},
        "parameters": {"before": parameter_count(args), "after": parameter_count(new)},
        "sizes": {key: [getattr(args, key), getattr(new, key)] for key in
                  ("num_layers", "num_heads", "num_kv_heads", "intermediate_size", "hidden_size")},
        "layers": layers,
        "attention": {"head_scores": importance.heads.tolist(), "kv_group_scores": groups.tolist(),
                      "kept_kv_groups": plan.kv_groups},
        "mlp": {"channel_scores": importance.channels.tolist(), "kept_channels": plan.channels},
        "hidden": {"channel_scores": importance.hidden.tolist(), "kept_channels": plan.hidden},
    }
