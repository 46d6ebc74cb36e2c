"""HF checkpoints in and out: exact round trips, sharding, atomic step folders, recipe state,
and bad input that fails with a named file and writes nothing."""

import json
import random

import pytest
import torch
from safetensors import safe_open

from kdtune.checkpointing import (
    HFCheckpointer,
    latest_checkpoint,
    load_model,
    load_recipe_state,
    write_random_checkpoint,
)
from kdtune.checkpointing.hf_format import parse_size
from kdtune.errors import KDTuneError, user_errors
from kdtune.models import TransformerDecoder, builders
from tests.models.tiny import CONFIGS, make_checkpoint

TOKENIZER_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": '{"x": 1}', "generation_config.json": "{}"}


def _source(tmp_path, name, **kwargs):
    src = make_checkpoint(name, tmp_path / "src", **kwargs)
    for file, text in TOKENIZER_FILES.items():
        (src / file).write_text(text)
    return src


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("source_shards", [None, 30_000], ids=["single", "sharded"])
def test_load_save_load_is_exact(tmp_path, name, source_shards):
    src = _source(tmp_path, name, max_shard_size=source_shards)
    ckpt = HFCheckpointer(src, tmp_path / "out", max_shard_size="40KB")
    state = ckpt.load()
    out = ckpt.save(state, step=3)
    assert out == tmp_path / "out" / "step_3"
    _assert_same(HFCheckpointer(out).load(), state)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) <= 40_000 or len(list(f.keys())) == 1
    for file, text in TOKENIZER_FILES.items():
        assert (out / file).read_text() == text
    assert json.loads((out / "config.json").read_text()) == dict(json.loads((src / "config.json").read_text()))
    assert ("lm_head.weight" in index["weight_map"]) != CONFIGS[name]["tie_word_embeddings"]


def test_bf16_save_updates_torch_dtype_and_single_file_when_it_fits(tmp_path):
    src = _source(tmp_path, "qwen2")
    ckpt = HFCheckpointer(src, tmp_path / "out")
    out = ckpt.save(ckpt.load(dtype=torch.bfloat16), epoch=0)
    assert out.name == "epoch_0" and (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {p.dtype for p in load_model(out, dtype=None).parameters()} == {torch.bfloat16}


def test_saved_sharded_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers checks the output is standard HF")
    src = _source(tmp_path, "qwen3")
    out = HFCheckpointer(src, tmp_path / "out", max_shard_size=20_000).save(HFCheckpointer(src).load(), step=1)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 160, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), reference(x).logits, atol=1e-5, rtol=0)


def test_load_is_memory_mapped_without_a_copy(tmp_path):
    """Same dtype on CPU: the tensors are views of the file, not copies (the peak-memory story)."""
    src = _source(tmp_path, "llama")
    state = HFCheckpointer(src).load(dtype=torch.float32)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        again = f.get_tensor("model.norm.weight")
    assert torch.equal(state["norm.weight"], again)
    converted = HFCheckpointer(src).load(dtype=torch.bfloat16)
    assert converted["norm.weight"].dtype == torch.bfloat16


def test_builder_model_is_checked_and_filled(tmp_path):
    src = _source(tmp_path, "qwen2")
    ckpt = HFCheckpointer(src)
    with torch.device("meta"):
        model = TransformerDecoder(ckpt.model_args, num_output_chunks=2)
    filled = ckpt.load_model(model)
    assert filled is model and filled.num_output_chunks == 2 and not filled.embed_tokens.weight.is_meta
    with torch.device("meta"):
        published = builders.qwen2_0_5b()
    with pytest.raises(KDTuneError, match=r"config.json: vocab_size is 160 but the model builder expects 151936"):
        ckpt.load_model(published)


def test_recipe_state_beside_weights_and_latest_checkpoint(tmp_path):
    src = _source(tmp_path, "llama")
    ckpt = HFCheckpointer(src, tmp_path / "out")
    state = ckpt.load()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    recipe_state = {
        "optimizer": optimizer.state_dict(),
        "epoch": 1,
        "step": 7,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "data": {"sampler_epoch": 1, "position": 42},
    }
    assert latest_checkpoint(tmp_path / "out") is None
    first = ckpt.save(state, step=5)
    second = ckpt.save(state, step=7, recipe_state=recipe_state)
    (tmp_path / "out" / ".step_9.tmpabc").mkdir()  # a crashed save: never a candidate
    (tmp_path / "out" / "step_11").mkdir()  # no config.json: not complete
    third = ckpt.save(state, epoch=1)  # weights only
    assert latest_checkpoint(tmp_path / "out") == third
    assert latest_checkpoint(tmp_path / "out", with_recipe_state=True) == second
    loaded = load_recipe_state(second)
    assert loaded["step"] == 7 and loaded["data"] == {"sampler_epoch": 1, "position": 42}
    assert torch.equal(loaded["rng"]["torch"], recipe_state["rng"]["torch"])
    assert loaded["rng"]["python"] == recipe_state["rng"]["python"]
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    with pytest.raises(KDTuneError, match="recipe_state.pt: not found"):
        load_recipe_state(first)


def test_existing_step_folder_is_never_overwritten(tmp_path):
    src = _source(tmp_path, "llama")
    ckpt = HFCheckpointer(src, tmp_path / "out")
    out = ckpt.save(ckpt.load(), step=1)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(KDTuneError, match="step_1: already exists"):
        ckpt.save(ckpt.load(), step=1)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_1"]


def test_failure_mid_save_leaves_nothing(tmp_path):
    src = _source(tmp_path, "llama")
    ckpt = HFCheckpointer(src, tmp_path / "out")
    seen = []

    def write_extra(folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(ckpt.load(), step=1, write_extra=write_extra)
    assert "model.safetensors" in seen[0]  # the weights were written, then thrown away
    assert list((tmp_path / "out").iterdir()) == []


def _truncate(src):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return "model.safetensors: not a readable safetensors file, truncated or corrupt"


def _drop_shard(src):
    shard = sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (src / shard).unlink()
    return f"{shard}: named in model.safetensors.index.json but missing"


def _index_lies(src):
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    elsewhere = [s for s in shards if s != index["weight_map"]["model.norm.weight"]][0]
    index["weight_map"]["model.norm.weight"] = elsewhere
    index_path.write_text(json.dumps(index))
    return "the index places 'model.norm.weight' here but the file lacks it"


def _garbage(src):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return "model.safetensors: not a readable safetensors file"


def _no_weights(src):
    (src / "model.safetensors").unlink()
    return "no model.safetensors or model.safetensors.index.json"


def _no_config(src):
    (src / "config.json").unlink()
    return "config.json: not found"


def _bad_model_type(src):
    (src / "config.json").write_text(json.dumps(dict(CONFIGS["llama"], model_type="gpt2")))
    return "unsupported model_type 'gpt2'"


def _wrong_shape(src):
    (src / "config.json").write_text(json.dumps(dict(CONFIGS["llama"], intermediate_size=80)))
    return "'model.layers.0.mlp.gate_proj.weight' has shape (96, 64), config.json implies (80, 64)"


@pytest.mark.parametrize(
    "breakage", [_truncate, _drop_shard, _index_lies, _garbage, _no_weights, _no_config, _bad_model_type, _wrong_shape]
)
def test_bad_checkpoints_are_one_line_errors_and_write_nothing(tmp_path, capsys, breakage):
    src = _source(tmp_path, "llama", max_shard_size=30_000 if breakage in (_drop_shard, _index_lies) else None)
    message = breakage(src)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info, user_errors():
        ckpt = HFCheckpointer(src, out)
        ckpt.save(ckpt.load_model().state_dict(), step=1)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kdtune: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_write_random_checkpoint_is_seeded_and_sharded(tmp_path):
    a = write_random_checkpoint(CONFIGS["qwen3"], tmp_path / "a", seed=1, dtype=torch.bfloat16, max_shard_size="30KB")
    b = write_random_checkpoint(CONFIGS["qwen3"], tmp_path / "b", seed=1, dtype=torch.bfloat16)
    assert (a / "model.safetensors.index.json").is_file() and (b / "model.safetensors").is_file()
    _assert_same(HFCheckpointer(a).load(), HFCheckpointer(b).load())
    config = json.loads((a / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["Qwen3ForCausalLM"]


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), (1024, 1024), ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "-1GB", 0, "3TB"])
def test_parse_size_rejects(text):
    with pytest.raises(KDTuneError, match="max_shard_size"):
        parse_size(text)


def test_gemma3_vision_language_checkpoint_gives_its_text_model(tmp_path):
    """Gemma 3 from 4B up ships as Gemma3ForConditionalGeneration: kdtune runs its text model (the
    logits transformers gives for text alone), leaving the vision tower out, also when text_config
    omits what equals transformers' defaults; it saves that model as a text-only checkpoint."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, sliding_window=8, rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "vlm")
    saved = json.loads((tmp_path / "vlm" / "config.json").read_text())
    for key in ("query_pre_attn_scalar", "rms_norm_eps", "hidden_activation", "max_position_embeddings"):
        saved["text_config"].pop(key)  # transformers' defaults, as the published config.json leaves them out
    (tmp_path / "vlm" / "config.json").write_text(json.dumps(saved))
    reference = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm", dtype=torch.float32).eval()
    tokens = torch.randint(0, 160, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        got = load_model(tmp_path / "vlm")(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    checkpointer = HFCheckpointer(tmp_path / "vlm", tmp_path / "out")
    step = checkpointer.save(checkpointer.load(), step=1)
    assert json.loads((step / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    text_only = transformers.AutoModelForCausalLM.from_pretrained(step, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(text_only(tokens).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(step)(tokens), expected, atol=1e-5, rtol=0)
