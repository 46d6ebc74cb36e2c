"""Building blocks of the decoder: attention, RoPE, RMSNorm, MLP, KV cache, LoRA (one file each)."""
