"""LoRA and QLoRA: low-rank adapters on a model's linear projections.

A wrapped projection computes ``base(x) + scaling * B(A(dropout(x)))`` with the base weight frozen
(optionally stored in NF4 through torchao, which is QLoRA) and only ``A`` [rank, in] and ``B``
[out, rank] trainable. ``B`` starts at zero, so applying LoRA leaves the model's outputs unchanged.

``LoRALinear`` keeps ``weight`` and ``bias`` under ``nn.Linear``'s names, so a native state dict
loads into a LoRA model with ``strict=False`` and the adapter keys are the extra ``lora_a.weight``
/ ``lora_b.weight`` entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import KDTuneError

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
OUTPUT_MODULE = "lm_head"
# Phi-3 keeps q/k/v and gate/up as single projections (as its checkpoints and PEFT do): naming q, k
# and v adapts its qkv_proj, the MLP its gate_up_proj and down_proj.
FUSED_QKV, FUSED_GATE_UP = "qkv_proj", "gate_up_proj"
FUSED_MLP_MODULES = (FUSED_GATE_UP, "down_proj")

# torchao's NF4 defaults: 64 weights share a scale, 256 scales share a second-level scale.
_NF4_BLOCK = 64
_NF4_SCALER_BLOCK = 256


def quantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Quantize a weight to NF4 with torchao's block sizes where its size allows.

    torchao needs the number of 64-weight blocks to be a multiple of the second-level block; tiny
    (test-sized) layers get the largest power-of-two second-level block that divides it instead.
    torchao's ``clone`` (so ``copy.deepcopy``) re-quantizes with its defaults and fails on those.
    """
    from torchao.quantization import to_nf4 as torchao_to_nf4  # slow import, only for QLoRA

    if weight.numel() % _NF4_BLOCK:
        raise KDTuneError(
            f"quantize_base: a weight of shape {list(weight.shape)} has {weight.numel()} elements, "
            f"not a multiple of NF4's block size {_NF4_BLOCK}"
        )
    scaler_block = math.gcd(weight.numel() // _NF4_BLOCK, _NF4_SCALER_BLOCK)
    return torchao_to_nf4(weight.detach(), _NF4_BLOCK, scaler_block)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``rank`` update scaled by ``alpha / rank``.

    With ``quantize_base`` the frozen weight is an NF4 tensor; ``F.linear`` on it dequantizes to
    the input's dtype on the fly (forward and backward to the input), so no full-precision copy of
    the base weight is kept between steps.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        quantize_base: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_dim, out_dim
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        base = nn.Linear(in_dim, out_dim, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()
        if quantize_base:
            self.quantize_base()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0, quantize_base: bool = False
    ) -> LoRALinear:
        """Wrap an existing layer, taking over its weight and bias tensors without copying them."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout,
            bias=linear.bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        layer.lora_a.to_empty(device=weight.device)
        layer.lora_b.to_empty(device=weight.device)
        layer.reset_lora_parameters()
        if quantize_base:
            layer.quantize_base()
        return layer.train(linear.training)  # keep the model's train/eval mode (dropout)

    def reset_lora_parameters(self) -> None:
        """A as ``nn.Linear`` initializes its weight (Kaiming-uniform, as PEFT does), B at zero."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def quantize_base(self) -> None:
        """Store the frozen base weight in NF4 (QLoRA); the bias, if any, stays as it is."""
        self.weight = nn.Parameter(quantize_nf4(self.weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``base + scaling * B @ A`` in the adapters' dtype (NF4 dequantized); differentiable in A and B."""
        base = self.weight.to(self.lora_b.weight.dtype)  # dequantizes an NF4 base, no-op otherwise
        return base + self.scaling * (self.lora_b.weight @ self.lora_a.weight)

    def extra_repr(self) -> str:
        quantized = type(self.weight).__name__ == "NF4Tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, bias={self.bias is not None}, nf4_base={quantized}"
        )


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def check_lora_args(lora_attn_modules, lora_rank, lora_alpha, lora_dropout) -> None:
    bad = [m for m in lora_attn_modules if m not in ATTN_MODULES]
    if bad or isinstance(lora_attn_modules, str):
        shown = lora_attn_modules if isinstance(lora_attn_modules, str) else bad
        raise KDTuneError(f"lora_attn_modules: {shown!r} is not a list of {list(ATTN_MODULES)}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise KDTuneError(f"lora_rank: must be a positive integer, got {lora_rank!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise KDTuneError(f"lora_alpha: must be a positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise KDTuneError(f"lora_dropout: must be in [0, 1), got {lora_dropout!r}")


def apply_lora(
    model: nn.Module,
    *,
    lora_attn_modules=("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
) -> nn.Module:
    """Wrap the chosen projections in ``LoRALinear`` in place and freeze everything but the adapters.

    Targets are ``*.self_attn.<name>`` for each of ``lora_attn_modules``, every ``*.mlp.{gate,up,
    down}_proj`` with ``apply_lora_to_mlp``, and ``lm_head`` with ``apply_lora_to_output``. In a model
    with fused projections (Phi-3) q, k and v are adapted together as ``qkv_proj`` (name all three
    or none) and the MLP as ``gate_up_proj`` and ``down_proj``.
    ``quantize_base`` stores the base weights of exactly these wrapped layers in NF4; all other
    weights (embeddings, norms, projections without LoRA) keep their dtype. Load the base weights
    and cast the model before calling this, so the NF4 weights are made from the real ones.
    """
    check_lora_args(lora_attn_modules, lora_rank, lora_alpha, lora_dropout)
    if apply_lora_to_output and not isinstance(getattr(model, OUTPUT_MODULE, None), nn.Linear):
        raise KDTuneError(
            "apply_lora_to_output: this model ties its output projection to embed_tokens "
            "(it has no lm_head), so there is no separate output layer to adapt; set it to false"
        )
    fused = any(name.endswith(f".{FUSED_QKV}") for name, _ in model.named_modules())
    attn = set(lora_attn_modules)
    if fused:
        named = attn & {"q_proj", "k_proj", "v_proj"}
        if named and len(named) < 3:
            raise KDTuneError(f"lora_attn_modules: {sorted(named)} names part of this model's fused {FUSED_QKV} "
                              f"(Phi-3 projects q, k and v as one); name all of q_proj, k_proj, v_proj or none")
        attn = (attn - named) | ({FUSED_QKV} if named else set())
    suffixes = {f"self_attn.{m}" for m in attn}
    if apply_lora_to_mlp:
        suffixes |= {f"mlp.{m}" for m in (FUSED_MLP_MODULES if fused else MLP_MODULES)}
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and ((name == OUTPUT_MODULE and apply_lora_to_output) or any(f".{name}".endswith(f".{s}") for s in suffixes))
    ]
    if not targets:
        raise KDTuneError(
            "lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output: they select no layer of the "
            "model, so nothing would train"
        )
    for name in targets:
        layer = model.get_submodule(name)
        if lora_rank > min(layer.in_features, layer.out_features):
            raise KDTuneError(
                f"lora_rank: {lora_rank} exceeds the smaller side of {name} ({layer.out_features} x "
                f"{layer.in_features}); a rank above it adds parameters but no capacity"
            )
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear.from_linear(
            getattr(parent, leaf), rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, quantize_base=quantize_base
        )
        setattr(parent, leaf, lora)
    set_trainable_lora(model)
    return model


def set_trainable_lora(model: nn.Module) -> None:
    """Make the adapter weights the only parameters that require gradients."""
    model.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_a.weight.requires_grad_(True)
        module.lora_b.weight.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under the model's own names (``<module>.lora_a.weight`` ...)."""
    return {
        f"{name}.{part}.weight": getattr(module, part).weight
        for name, module in lora_modules(model).items()
        for part in ("lora_a", "lora_b")
    }


@torch.no_grad()
def merge_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA layer folded into a plain ``nn.Linear`` weight.

    Keys are the native names of a model without LoRA, so the result saves as an ordinary
    checkpoint; NF4 bases come out dequantized in the adapters' dtype.
    """
    layers = lora_modules(model)
    adapter_keys = set(lora_state_dict(model))
    state = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    for name, module in layers.items():
        state[f"{name}.weight"] = module.merged_weight()
    return state
