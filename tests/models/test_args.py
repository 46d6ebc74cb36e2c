"""Architecture from config.json, the named builders, and the vocabulary check."""

import pytest
import torch

from kdtune.errors import KDTuneError
from kdtune.models import ModelArgs, builders
from tests.models.tiny import CONFIGS

# Total parameters (billions, as the model cards round them) and, where the card gives it, the
# non-embedding count: an independent check of every dimension the builders hard-code.
PUBLISHED_SIZES = {
    "qwen2_0_5b": (0.49, 0.36),
    "qwen2_1_5b": (1.54, 1.31),
    "qwen2_5_0_5b": (0.49, 0.36),
    "qwen2_5_1_5b": (1.54, 1.31),
    "qwen2_5_7b": (7.61, 6.53),
    "qwen3_0_6b": (0.6, 0.44),
    "qwen3_1_7b": (None, 1.4),  # the card's "1.7B" total is too rounded to check
    "llama3_2_1b": (1.24, None),
    "llama3_2_3b": (3.21, None),
    "llama3_1_8b": (8.03, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_builders_have_published_sizes(name):
    with torch.device("meta"):
        model = getattr(builders, name)()
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.embed_tokens.weight.numel() * (1 if model.args.tie_word_embeddings else 2)
    expected_total, expected_body = PUBLISHED_SIZES[name]
    if expected_total is not None:
        assert total / 1e9 == pytest.approx(expected_total, abs=0.01 + 0.005 * expected_total)
    if expected_body is not None:
        assert (total - embeddings) / 1e9 == pytest.approx(expected_body, abs=0.01)


def test_variants_read_from_config():
    qwen2 = ModelArgs.from_hf_config(CONFIGS["qwen2"])
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings and not qwen2.qk_norm
    qwen3 = ModelArgs.from_hf_config(CONFIGS["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
    llama = ModelArgs.from_hf_config(CONFIGS["llama3_scaled"])
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias and llama.rope_scaling["factor"] == 8.0
    assert ModelArgs.from_hf_config(CONFIGS["llama"]).head_dim == 16


def test_rope_parameters_spelling_equals_classic_keys():
    """Newer transformers write ``rope_parameters`` (theta inside) instead of rope_theta/rope_scaling."""
    classic = dict(CONFIGS["llama3_scaled"])
    newer = {k: v for k, v in classic.items() if k not in ("rope_theta", "rope_scaling")}
    newer["rope_parameters"] = dict(classic["rope_scaling"], rope_theta=classic["rope_theta"])
    assert ModelArgs.from_hf_config(newer) == ModelArgs.from_hf_config(classic)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "falcon"}, "unsupported model_type 'falcon'"),
        ({"model_type": "phi3", "rope_scaling": {"type": "dynamic"}}, "unsupported rope scaling type 'dynamic'"),
        ({"model_type": "phi3", "rope_scaling": {"type": "su"}}, "longrope rope scaling is missing short_factor"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping is a Gemma setting"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be a positive integer"),
        ({"model_type": "gemma2", "final_logit_softcapping": -1}, "final_logit_softcapping must be a positive"),
        ({"model_type": "gemma2", "layer_types": ["full_attention"]}, "layer_types must list"),
        ({"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"] * 2}, "layer_types: mistral applies"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"hidden_size": None}, None),
    ],
)
def test_unsupported_configs_are_user_errors(change, message):
    cfg = {k: v for k, v in dict(CONFIGS["llama"], **change).items() if v is not None}
    with pytest.raises(KDTuneError, match=message or "missing required key 'hidden_size'"):
        ModelArgs.from_hf_config(cfg, source="ckpt/config.json")


def test_builder_mismatch_names_field_and_both_values():
    args = ModelArgs.from_hf_config(CONFIGS["qwen2"])
    with pytest.raises(KDTuneError, match=r"ckpt/config.json: num_layers is 3 but the model builder expects 2"):
        args.check_matches(args.replace(num_layers=3), "ckpt/config.json")


@pytest.mark.parametrize("family", ["mistral", "phi3", "gemma2", "gemma3_text"])
def test_keys_left_out_take_transformers_defaults(family):
    """A config.json without its family's optional keys reads as transformers' config class fills
    them in (what transformers would then run)."""
    transformers = pytest.importorskip("transformers", reason="transformers' config classes are the reference")
    optional = ("rms_norm_eps", "sliding_window", "rope_theta", "rope_parameters", "query_pre_attn_scalar",
                "attn_logit_softcapping", "final_logit_softcapping", "layer_types", "tie_word_embeddings",
                "hidden_activation", "head_dim")
    trimmed = {k: v for k, v in CONFIGS[family].items() if k not in optional}
    filled = transformers.AutoConfig.for_model(**trimmed).to_dict()
    assert ModelArgs.from_hf_config(trimmed) == ModelArgs.from_hf_config(filled)
