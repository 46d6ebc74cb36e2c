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
    "forward_kl": "kdtune.losses.ForwardKLLoss",
    "reverse_kl": "kdtune.losses.ReverseKLLoss",
    "jsd": "kdtune.losses.GeneralizedJSDLoss",
    "skew_forward_kl": "kdtune.losses.SkewForwardKLLoss",
    "skew_reverse_kl": "kdtune.losses.SkewReverseKLLoss",
    "tvd": "kdtune.losses.TVDLoss",
    # teachers with another tokenizer (teacher_tokenizer set): aligned spans compared
    "uld": "kdtune.losses.ULDLoss",
    "hybrid_uld": "kdtune.losses.HybridULDLoss",
    # hidden-state losses (hidden_state_loss: {_component_: cosine, ...})
    "cosine": "kdtune.losses.CosineHiddenStateLoss",
    "mse": "kdtune.losses.MSEHiddenStateLoss",
    "normalized_mse": "kdtune.losses.NormalizedMSEHiddenStateLoss",
    # --- models and checkpointing (kdtune.models, kdtune.checkpointing) ---
    "qwen2_0_5b": "kdtune.models.qwen2_0_5b",
    "qwen2_1_5b": "kdtune.models.qwen2_1_5b",
    "qwen2_5_0_5b": "kdtune.models.qwen2_5_0_5b",
    "qwen2_5_1_5b": "kdtune.models.qwen2_5_1_5b",
    "qwen2_5_7b": "kdtune.models.qwen2_5_7b",
    "qwen3_0_6b": "kdtune.models.qwen3_0_6b",
    "qwen3_1_7b": "kdtune.models.qwen3_1_7b",
    "llama3_2_1b": "kdtune.models.llama3_2_1b",
    "llama3_2_3b": "kdtune.models.llama3_2_3b",
    "llama3_1_8b": "kdtune.models.llama3_1_8b",
    "hf_checkpointer": "kdtune.checkpointing.HFCheckpointer",
    # --- tokenizers and datasets (kdtune.tokenization, kdtune.datasets) ---
    "tokenizer": "kdtune.tokenization.load_tokenizer",
    "alpaca": "kdtune.datasets.alpaca_dataset",
    "chat": "kdtune.datasets.chat_dataset",
    "text_completion": "kdtune.datasets.text_completion_dataset",
    "prompts": "kdtune.datasets.prompt_dataset",
    "arithmetic": "kdtune.datasets.arithmetic_dataset",
    # --- training (kdtune.training) ---
    "cosine_with_warmup": "kdtune.training.schedules.get_cosine_schedule_with_warmup",
    "jsonl_logger": "kdtune.training.metric_logging.JsonlLogger",
    "stdout_logger": "kdtune.training.metric_logging.StdoutLogger",
    "tensorboard_logger": "kdtune.training.metric_logging.TensorBoardLogger",
    "wandb_logger": "kdtune.training.metric_logging.WandBLogger",
    "multi_logger": "kdtune.training.metric_logging.MultiLogger",
}
