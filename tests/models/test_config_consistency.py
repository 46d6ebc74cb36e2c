"""A checkpoint's config.json is checked field against field before any weight loads: a
contradiction (or a size that is not a positive integer) is one line naming the field."""

import pytest

from kdtune.errors import KDTuneError
from kdtune.models.args import ModelArgs
from tests.recipes.conftest import tiny_config

BASE = tiny_config(2, 64, 4, 2)  # 4 query heads of 16 channels, 2 key/value heads


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4, and no head_dim"),
    ({"head_dim": 15}, "head_dim=15 is odd; rotary embeddings rotate pairs"),
    ({"hidden_size": 60, "num_attention_heads": 4}, "head_dim=15 is odd"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"intermediate_size": -128}, "intermediate_size must be a positive integer, got -128"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer, got 2.5"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"num_attention_heads": True}, "num_attention_heads must be a positive integer, got True"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive number, got -1.0"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
])
def test_a_contradiction_names_the_field(change, message):
    with pytest.raises(KDTuneError, match="^config.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        ModelArgs.from_hf_config({**BASE, **change})


def test_a_consistent_config_reads():
    args = ModelArgs.from_hf_config({**BASE, "head_dim": 32})  # an explicit head_dim may differ from hidden/heads
    assert args.head_dim == 32 and args.num_kv_heads == 2
