"""Caching a teacher's top-k log-probabilities and distilling from the cache, end to end on the tiny
world (recipes run in this process; one run through the CLI checks the error's form): k = vocabulary
reproduces the online teacher's losses, packed or not; k = 64 of 283 ids stays within a stated
tolerance; an interrupted cache resumes to the same bytes; a cache for other data, tokenizer or
settings is refused."""

import json
import runpy
import shutil

import pytest
import torch

import kdtune
import kdtune.offline.writer
from kdtune.checkpointing import write_random_checkpoint
from kdtune.datasets import alpaca_dataset
from kdtune.errors import KDTuneError
from kdtune.offline import CachedTeacherDataset
from kdtune.offline.packing import bytes_per_row
from kdtune.training import read_metrics
from tests.cli_utils import REPO, assert_user_error, run_kdtune
from tests.recipes.conftest import base_overrides, tiny_config

STEPS = ("max_steps_per_epoch=3", "batch_size=8", "kd_ratio=0.5")
# Step 1 (the same student either way): with a teacher as peaked as a language model's (its top 64
# of 283 ids hold ~98.5% of the probability), the KD term from exact top-64 rows is a lower bound of
# the full one, within this relative distance of it; the default q8 storage is within 1% of exact rows.
TOP64_KD_TOLERANCE = 0.02


def recipe(name):
    return runpy.run_path(str(REPO / "recipes" / f"{name}.py"))["main"]


@pytest.fixture(scope="module")
def teacher(world, tmp_path_factory):
    """The world's teacher, sharper: predictive entropy ~2.4 nats instead of ~4.5 (near uniform)."""
    folder = tmp_path_factory.mktemp("sharp") / "teacher"
    write_random_checkpoint(tiny_config(3, 64, 4, 2, init=0.4), folder, seed=1)
    for f in world["tokenizer"].iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def make_cache(world, teacher, out, *extra):
    recipe("cache_teacher_logits")(cache_args(world, teacher, out, *extra))


def cache_args(world, teacher, out, *extra) -> list[str]:
    return ["--config", "tiny/cache_teacher_logits", f"output_dir={out}",
            f"teacher_checkpointer.checkpoint_dir={teacher}", f"tokenizer.path={world['student']}",
            f"dataset.data_files={world['data']}", *extra]


def distill_args(world, teacher, out, cache=None, *extra) -> list[str]:
    source = ["~teacher_checkpointer", f"+teacher_logits_cache={cache}"] if cache else \
        [f"teacher_checkpointer.checkpoint_dir={teacher}"]
    return ["--config", "tiny/KD_full_single_device", *base_overrides(world, out), *STEPS, *source, *extra]


def distill(world, teacher, out, cache=None, *extra):
    recipe("knowledge_distillation_single_device")(distill_args(world, teacher, out, cache, *extra))
    return [[m[key] for key in ("loss", "ce_loss", "kd_loss")] for m in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def vocab_size(world):
    return kdtune.load_tokenizer(world["student"]).vocab_size


@pytest.fixture(scope="module")
def online(world, teacher, tmp_path_factory):
    return distill(world, teacher, tmp_path_factory.mktemp("online") / "run")


@pytest.fixture(scope="module")
def top64(world, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("top64") / "cache"
    make_cache(world, teacher, out)
    return out


def test_k_equal_to_the_vocabulary_gives_the_online_losses(world, teacher, online, vocab_size, tmp_path):
    make_cache(world, teacher, tmp_path / "cache", f"top_k={vocab_size}", "logprob_dtype=fp32")
    offline = distill(world, teacher, tmp_path / "run", tmp_path / "cache")
    assert len(offline) == len(online) == 3 and online[0][2] > 0.5
    torch.testing.assert_close(torch.tensor(offline), torch.tensor(online), atol=1e-5, rtol=1e-5)


def test_packed_samples_too(world, teacher, vocab_size, tmp_path):
    packed = ("dataset.packed=true", "batch_size=2", "max_steps_per_epoch=2")
    make_cache(world, teacher, tmp_path / "cache", f"top_k={vocab_size}", "logprob_dtype=fp32", packed[0])
    online = distill(world, teacher, tmp_path / "online", None, *packed)
    offline = distill(world, teacher, tmp_path / "offline", tmp_path / "cache", *packed)
    torch.testing.assert_close(torch.tensor(offline), torch.tensor(online), atol=1e-5, rtol=1e-5)


def test_top_64_stays_close_to_the_online_teacher(world, teacher, online, top64, vocab_size, tmp_path):
    index = json.loads((top64 / "index.json").read_text())
    settings = (index["top_k"], index["vocab_size"], index["logprob_dtype"])
    assert settings == (64, vocab_size, "q8")  # the default storage
    assert index["complete"] and index["num_rows"] == sum(count for _, _, count in index["samples"])
    assert index["teacher"] == {"checkpoint_dir": str(teacher), "dtype": "fp32", "quantize": None, "vocab_size": 320,
                                "vocab_check": "tokenizer"}
    stored = sum(safetensors_bytes(top64 / name) for name in index["shards"])
    assert stored == index["num_rows"] * bytes_per_row(64, vocab_size)
    make_cache(world, teacher, tmp_path / "exact", "logprob_dtype=fp32")
    exact = distill(world, teacher, tmp_path / "exact_run", tmp_path / "exact")
    offline = distill(world, teacher, tmp_path / "run", top64)
    (_, ce_off, kd_off), (_, ce_exact, kd_exact), (_, ce_on, kd_on) = offline[0], exact[0], online[0]
    assert ce_off == pytest.approx(ce_on, rel=1e-5) and ce_exact == pytest.approx(ce_on, rel=1e-5)
    assert kd_exact <= kd_on and kd_exact == pytest.approx(kd_on, rel=TOP64_KD_TOLERANCE), (kd_exact, kd_on)
    assert kd_off == pytest.approx(kd_exact, rel=0.01), (kd_off, kd_exact)  # q8 against exact top-64 rows


def safetensors_bytes(path) -> int:
    """The tensor bytes of a safetensors file (its size less the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


class Killed(Exception):
    """Stands for the process dying mid-run."""


def test_an_interrupted_cache_resumes_to_the_same_files(world, teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDTUNE_DEBUG", "1")  # user errors raise here instead of exiting
    args = ("samples_per_shard=16", "batch_size=4")  # 4 shards of 4 batches
    make_cache(world, teacher, tmp_path / "whole", *args)
    real, calls = kdtune.offline.writer.teacher_topk, []

    def dies_in_the_second_shard(*a, **kw):
        if len(calls) == 6:
            raise Killed
        calls.append(1)
        return real(*a, **kw)

    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(kdtune.offline.writer, "teacher_topk", dies_in_the_second_shard)
        with pytest.raises(Killed):
            make_cache(world, teacher, cut, *args)
    assert sorted(p.name for p in cut.iterdir()) == ["index.json", "shard-00001-of-00004.safetensors"]
    with pytest.raises(KDTuneError, match="incomplete"):
        distill(world, teacher, tmp_path / "run", cut)

    make_cache(world, teacher, cut, *args)  # resumes
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in cut.iterdir()) == files and len(files) == 5
    for name in files:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    capsys.readouterr()
    make_cache(world, teacher, cut, *args)
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(KDTuneError, match="samples_per_shard: 16 vs 8"):
        make_cache(world, teacher, cut, "samples_per_shard=8", "batch_size=4")


def open_cache(world, cache, *, data=None, tokenizer_dir=None, max_seq_len=256, temperature=1.0):
    tokenizer = kdtune.load_tokenizer(tokenizer_dir or world["student"])
    dataset = alpaca_dataset(tokenizer, source="json", data_files=str(data or world["data"]), max_seq_len=max_seq_len)
    return CachedTeacherDataset(dataset, cache, tokenizer=tokenizer, temperature=temperature)


def test_a_cache_for_other_data_tokenizer_or_settings_is_refused(world, teacher, top64, tmp_path, monkeypatch):
    assert len(open_cache(world, top64)) == 64
    rows = json.loads(world["data"].read_text())
    rows[5]["output"] += " 1"
    (tmp_path / "edited.json").write_text(json.dumps(rows))
    with pytest.raises(KDTuneError, match="different dataset"):
        open_cache(world, top64, data=tmp_path / "edited.json")
    with pytest.raises(KDTuneError, match="max_seq_len=256 but .* max_seq_len=128"):
        open_cache(world, top64, max_seq_len=128)
    with pytest.raises(KDTuneError, match="temperature 1.0 but kd_loss.temperature is 2.0"):
        open_cache(world, top64, temperature=2.0)
    other = tmp_path / "other_tokenizer"
    shutil.copytree(world["tokenizer"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(KDTuneError, match="different tokenizer"):
        open_cache(world, top64, tokenizer_dir=other)
    with pytest.raises(KDTuneError, match="no teacher cache"):
        open_cache(world, tmp_path)
    monkeypatch.setenv("KDTUNE_DEBUG", "1")
    both = distill_args(world, teacher, tmp_path / "both", top64, "+teacher_checkpointer._component_=hf_checkpointer",
                        f"+teacher_checkpointer.checkpoint_dir={teacher}")
    with pytest.raises(KDTuneError, match="teacher_logits_cache and teacher_checkpointer"):
        recipe("knowledge_distillation_single_device")(both)
    monkeypatch.delenv("KDTUNE_DEBUG")
    # Through the command line: one line, exit status 2, before any weight is loaded.
    edited = f"dataset.data_files={tmp_path / 'edited.json'}"
    proc = run_kdtune("run", "knowledge_distillation_single_device",
                      *distill_args(world, teacher, tmp_path / "run", top64, edited))
    assert_user_error(proc, "teacher_logits_cache", "different dataset")


def test_the_distributed_recipe_distills_from_the_cache_too(world, teacher, vocab_size, tmp_path):
    make_cache(world, teacher, tmp_path / "cache", f"top_k={vocab_size}", "logprob_dtype=fp32")
    common = (*base_overrides(world, tmp_path / "single"), "max_steps_per_epoch=2", "~teacher_checkpointer",
              f"+teacher_logits_cache={tmp_path / 'cache'}")
    recipe("knowledge_distillation_single_device")(["--config", "tiny/KD_single_device", *common, "batch_size=4"])
    # 2 CPU processes with 2 samples each see the single device's batches of 4.
    proc = run_kdtune("run", "--nproc_per_node", "2", "--standalone", "knowledge_distillation_distributed",
                      "--config", "tiny/KD_distributed", *common, f"output_dir={tmp_path / 'sharded'}", "batch_size=2",
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, sharded = (torch.tensor([[m[k] for k in ("loss", "ce_loss", "kd_loss")] for m in read_metrics(d)])
                       for d in (tmp_path / "single" / "metrics.jsonl", tmp_path / "sharded" / "metrics.jsonl"))
    assert len(single) == 2
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=0)
