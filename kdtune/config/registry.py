"""Short names for components, so configs can say ``_component_: jsd`` instead of a dotted path.

Entries are dotted paths resolved lazily: listing the registry imports nothing heavy. A dotted path
to any importable callable works in a config too; this table only adds the short names.
"""

COMPONENTS: dict[str, str] = {
    # optimizers
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
    "adamw_8bit": "torchao.optim.AdamW8bit",
    "adamw_4bit": "torchao.optim.AdamW4bit",
    # --- losses (kdtune.losses) ---
    # --- models and checkpointing (kdtune.models, kdtune.checkpointing) ---
    # --- tokenizers and datasets (kdtune.tokenization, kdtune.datasets) ---
    # --- training (kdtune.training) ---
}
