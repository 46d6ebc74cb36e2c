"""``kdtune.load_model``: a checkpoint folder in, a ready-to-run model out."""

from __future__ import annotations

from pathlib import Path

import torch

from kdtune.checkpointing.hf_checkpointer import HFCheckpointer
from kdtune.models.decoder import TransformerDecoder


def load_model(
    checkpoint_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TransformerDecoder:
    """The model of a Hugging Face checkpoint folder, weights loaded, in eval mode."""
    return HFCheckpointer(checkpoint_dir).load_model(dtype=dtype, device=device).eval()
