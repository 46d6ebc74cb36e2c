"""A tiny world for running recipes end to end: a ChatML tokenizer trained on the data, a
2-layer student and a 3-layer teacher (random weights, HF format, tokenizer files beside them)
and an alpaca-format arithmetic file. The teacher's larger initial weights make its predictions
peaked, so the student has something to learn from it."""

import json
import shutil

import pytest

from kdtune.checkpointing import write_random_checkpoint
from kdtune.datasets import arithmetic_rows
from kdtune.tokenization.build import train_chatml_tokenizer
from tests.models.tiny import CONFIGS

VOCAB = 320  # the trained tokenizer has 300 ids; the models' embeddings are padded past it


def tiny_config(layers: int, hidden: int, heads: int, kv_heads: int, init: float = 0.05) -> dict:
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": VOCAB, "max_position_embeddings": 512, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "initializer_range": init}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root) -> dict:
    """The world's files under ``root``; the same bytes every time (seeded data, tokenizer, weights)."""
    rows = arithmetic_rows(64, seed=1, max_digits=2)
    alpaca = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
              for r in rows]
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    texts = [v for row in alpaca for v in row.values()] + ["user assistant system"]
    tokenizer = train_chatml_tokenizer(texts * 4, root / "tokenizer", vocab_size=300)
    dirs = {}
    for name, cfg, seed in (("student", tiny_config(2, 64, 4, 2), 0), ("teacher", tiny_config(3, 64, 4, 2, init=0.2), 1)):
        dirs[name] = write_random_checkpoint(cfg, root / name, seed=seed)
        for f in tokenizer.iterdir():
            shutil.copy(f, dirs[name] / f.name)
    return {"root": root, "data": root / "alpaca.json", "tokenizer": tokenizer, **dirs}


def base_overrides(world, out) -> list[str]:
    return [f"output_dir={out}", f"checkpointer.checkpoint_dir={world['student']}",
            f"dataset.data_files={world['data']}"]


def kd_overrides(world, out) -> list[str]:
    return base_overrides(world, out) + [f"teacher_checkpointer.checkpoint_dir={world['teacher']}"]


# The KD recipe on one process and on two (FSDP2, gloo) with the same global batch: name, launch args.
KD_ONE_AND_TWO_PROCESSES = (
    ("single", ("knowledge_distillation_single_device", "--config", "tiny/KD_single_device", "batch_size=4")),
    ("sharded", ("--nproc_per_node", "2", "--standalone", "knowledge_distillation_distributed",
                 "--config", "tiny/KD_distributed", "batch_size=2")),
)


FAMILIES = ["mistral", "phi3", "gemma2", "gemma3_text"]  # beyond the world's own Qwen2 models


def family_world(world, family, root):
    """The world with its student and teacher replaced by ``family`` models of the tokenizer's width."""
    dirs = dict(world)
    for name, layers, seed in (("student", 2, 0), ("teacher", 3, 1)):
        config = dict(CONFIGS[family], vocab_size=VOCAB, num_hidden_layers=layers, initializer_range=0.1)
        config.pop("layer_types", None)  # the family's own pattern for this depth, or for Gemma 3
        if family == "gemma3_text":  # local and global layers at this depth: every 2nd global
            config["layer_types"] = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
        dirs[name] = write_random_checkpoint(config, root / name, seed=seed)
        for f in world["tokenizer"].iterdir():
            shutil.copy(f, dirs[name] / f.name)
    return dirs
