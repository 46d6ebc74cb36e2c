"""kdtune: knowledge distillation for large language models."""

__version__ = "0.1.0"

# Public entry points, imported on first use so that `import kdtune` stays light (no torch).
_LAZY = {
    "load_model": "kdtune.checkpointing",
    "load_tokenizer": "kdtune.tokenization",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdtune' has no attribute {name!r}")
