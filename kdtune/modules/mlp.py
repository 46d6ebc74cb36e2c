"""The gated feed-forward block: SwiGLU (Llama, Qwen, Mistral, Phi-3) or GeGLU (Gemma)."""

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; plain ``nn.Linear`` projections so LoRA can wrap them by name.

    ``fused`` keeps gate and up as one ``gate_up_proj`` (gate rows first), as Phi-3 stores them, so
    its checkpoints and PEFT adapters map onto this module one to one.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, *, activation: str = "silu", fused: bool = False):
        super().__init__()
        self.act = _ACTIVATIONS[activation]
        if fused:
            self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        else:
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
            self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)
