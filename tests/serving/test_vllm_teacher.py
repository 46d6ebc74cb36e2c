"""A vLLM-served teacher against the same teacher run by kdtune: its top-k rows, a cache written from
it, KD and on-policy distillation from it, a server that dies mid-cache, and servers that are not the
teacher to distill from. Real engine, real weights (SmolLM2-135M-Instruct); `make test-vllm`."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import kdtune
from kdtune.datasets import arithmetic_rows, chat_dataset
from kdtune.offline.shards import decode_rows
from kdtune.offline.writer import teacher_topk
from kdtune.serving import ServedTeacher
from kdtune.training import read_metrics
from tests.cli_utils import ASSETS, assert_user_error, run_kdtune
from tests.recipes.conftest import KD_ONE_AND_TWO_PROCESSES
from tests.serving.conftest import VLLMServer, small_llama

pytestmark = [pytest.mark.vllm, pytest.mark.real]
K = 20


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Short chats (question, worked answer), the same every time."""
    rows = arithmetic_rows(24, seed=3, max_digits=2)
    for row in rows:
        row["messages"][1]["content"] += " I added the tens, then the ones."
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def student(vllm_server, tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer: what a pruned or fresh student would be."""
    return small_llama(vllm_server["checkpoint"], tmp_path_factory.mktemp("student") / "student")


def served_args(vllm_server, **options) -> list[str]:
    """The overrides that put the served teacher in a config's place of the teacher checkpoint."""
    options = {"base_url": vllm_server["base_url"], "model": vllm_server["model"], "top_k": K, **options}
    return ["~teacher_checkpointer", *(f"+teacher_server.{key}={value}" for key, value in options.items())]


def cache_args(tmp_path, name, chats, tokenizer_dir, *extra):
    return ("run", "cache_teacher_logits", "--config", "tiny/cache_teacher_logits", f"output_dir={tmp_path / name}",
            f"tokenizer.path={tokenizer_dir}", "dataset=chat", f"dataset.data_files={chats}", "dataset.source=jsonl",
            f"top_k={K}", "samples_per_shard=4", "batch_size=4", *extra)


def cached_rows(folder):
    index = json.loads((folder / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        out.append(decode_rows(load_file(folder / shard), index["logprob_dtype"], index["top_k"],
                               index["vocab_size"]))
    return torch.cat([lp for lp, _ in out]), torch.cat([i for _, i in out]), index


def test_served_top_k_rows_equal_the_local_teachers(vllm_server, chats):
    checkpoint = vllm_server["checkpoint"]
    tok, teacher = kdtune.load_tokenizer(checkpoint), kdtune.load_model(checkpoint)
    server = ServedTeacher(base_url=vllm_server["base_url"], model=vllm_server["model"], top_k=K,
                           vocab_size=tok.vocab_size)
    server.check(tok)
    samples = [chat_dataset(tok, data_files=str(chats), source="jsonl")[i] for i in range(6)]
    for sample, (logprobs, ids, own) in zip(samples, server.sample_rows(samples)):
        batch = {"tokens": torch.tensor([sample["tokens"]]), "labels": torch.tensor([sample["labels"]])}
        want, want_ids = teacher_topk(teacher, batch, teacher.output_weight, K, 1.0)
        same = (ids == want_ids).all(-1)
        assert same.float().mean() > 0.95  # a near-tie may swap two neighbours
        torch.testing.assert_close(logprobs[same], want[same], atol=1e-4, rtol=0)
        # and each trained token's own log-probability, what the sampled-token estimator scores
        hidden = teacher(batch["tokens"], return_hidden=True)[batch["labels"] != -100]
        labels = batch["labels"][batch["labels"] != -100]
        expected = (hidden @ teacher.output_weight.T).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
        torch.testing.assert_close(own, expected.detach(), atol=1e-4, rtol=0)


def test_a_cache_from_the_server_equals_one_from_the_local_teacher(vllm_server, chats, tmp_path):
    checkpoint = vllm_server["checkpoint"]
    local = run_kdtune(*cache_args(tmp_path, "local", chats, checkpoint, "logprob_dtype=fp32",
                                   f"teacher_checkpointer.checkpoint_dir={checkpoint}", "teacher.dtype=fp32"))
    assert local.returncode == 0, local.stderr
    remote = run_kdtune(*cache_args(tmp_path, "served", chats, checkpoint, *served_args(vllm_server)))  # q8, the default
    assert remote.returncode == 0, remote.stderr
    want, want_ids, _ = cached_rows(tmp_path / "local")
    got, got_ids, index = cached_rows(tmp_path / "served")
    assert index["logprob_dtype"] == "q8" and index["teacher"]["server_model"] == vllm_server["model"]
    assert (got_ids == want_ids).all(-1).float().mean() > 0.99  # a near-tie may swap two neighbours
    same = (got_ids == want_ids).all(-1)
    span = (want[:, 0] - want[:, -1])[:, None]  # q8 keeps each value within 1/127 of its row's span
    assert ((got - want).abs()[same] <= (span / 127 + 1e-4).expand_as(got)[same]).all()


def kd_args(tmp_path, name, chats, student, *extra):
    return ("run", "knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
            f"output_dir={tmp_path / name}", f"checkpointer.checkpoint_dir={student}", "dataset=chat",
            f"dataset.data_files={chats}", "dataset.source=jsonl", "batch_size=4", "max_steps_per_epoch=5",
            "lr_scheduler.num_warmup_steps=0", *extra)


def test_kd_from_the_server_takes_the_steps_of_kd_from_the_local_teachers_top_k(vllm_server, chats, student,
                                                                                  tmp_path):
    checkpoint = vllm_server["checkpoint"]
    proc = run_kdtune(*cache_args(tmp_path, "cache", chats, student, "logprob_dtype=fp32",
                                  f"teacher_checkpointer.checkpoint_dir={checkpoint}", "teacher.dtype=fp32"))
    assert proc.returncode == 0, proc.stderr
    local = run_kdtune(*kd_args(tmp_path, "local", chats, student, "~teacher_checkpointer",
                                f"+teacher_logits_cache={tmp_path / 'cache'}"))
    assert local.returncode == 0, local.stderr
    remote = run_kdtune(*kd_args(tmp_path, "served", chats, student, *served_args(vllm_server)))
    assert remote.returncode == 0, remote.stderr
    want, got = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("local", "served"))
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        for key in ("loss", "ce_loss", "kd_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)


def test_on_policy_distillation_grades_the_students_samples_through_the_server(vllm_server, student, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = arithmetic_rows(8, seed=5, max_digits=2)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_kdtune("run", "on_policy_distillation_single_device", "--config", "tiny/GKD_single_device",
                      f"output_dir={tmp_path / 'gkd'}", f"checkpointer.checkpoint_dir={student}",
                      f"dataset.data_files={prompts}", "dataset.source=jsonl", "lmbda=1.0", "batch_size=4", "max_steps_per_epoch=2", "generation.max_new_tokens=8",
                      *served_args(vllm_server))
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(tmp_path / "gkd" / "metrics.jsonl")
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) and m["loss"] > 0 for m in metrics)


def test_a_server_killed_mid_cache_is_one_line_and_the_rerun_finishes_the_cache(vllm_server, chats, tmp_path):
    """A second real server, SIGKILLed once the cache has a shard on disk, then started again."""
    checkpoint = vllm_server["checkpoint"]
    server = VLLMServer(checkpoint, tmp_path, "--max-logprobs", "64").start()
    try:
        options = {"base_url": server.info["base_url"], "max_concurrency": 1, "retries": 1}
        args = cache_args(tmp_path, "cache", chats, checkpoint, "batch_size=1", *served_args(vllm_server, **options))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KDTUNE_DEBUG", None)
        run = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", *map(str, args)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not list((tmp_path / "cache").glob("shard-*")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()
        stdout, stderr = run.communicate(timeout=300)
        proc = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
        assert_user_error(proc, "teacher_server: cannot reach", server.info["base_url"])
        written = sorted(p.name for p in (tmp_path / "cache").glob("shard-*"))
        assert 0 < len(written) < 6 and not list((tmp_path / "cache").glob(".*.tmp"))
        server.start()  # the same port
        proc = run_kdtune(*args)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    full = run_kdtune(*cache_args(tmp_path, "whole", chats, checkpoint, *served_args(vllm_server)))
    assert full.returncode == 0, full.stderr
    resumed, resumed_ids, index = cached_rows(tmp_path / "cache")
    whole, whole_ids, _ = cached_rows(tmp_path / "whole")
    assert index["complete"] and torch.equal(resumed_ids, whole_ids)
    torch.testing.assert_close(resumed, whole, atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", ["unreachable", "other model", "other tokenizer"])
def test_a_server_that_is_not_the_teacher_is_one_line_and_nothing_is_written(vllm_server, chats, student, case,
                                                                             tmp_path):
    options, tokenizer_dir, message = {}, student, ""
    if case == "unreachable":
        from tests.serving.conftest import free_port

        options, message = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "retries": 0}, "cannot reach"
    elif case == "other model":
        options, message = {"model": "Llama-3.1-70B-Instruct"}, "serves 'smollm2', not 'Llama-3.1-70B-Instruct'"
    else:
        tokenizer_dir, message = ASSETS / "qwen2_5_tokenizer", "tokenizer differs from the student's"
    proc = run_kdtune(*cache_args(tmp_path, "cache", chats, tokenizer_dir, *served_args(vllm_server, **options)))
    assert_user_error(proc, message)
    assert not (tmp_path / "cache").exists()
    if case != "other tokenizer":
        proc = run_kdtune(*kd_args(tmp_path, "kd", chats, student, *served_args(vllm_server, **options)))
        assert_user_error(proc, message)
        assert not (tmp_path / "kd").exists()


def test_two_processes_distill_from_the_server_as_one_does_validation_included(vllm_server, chats, student,
                                                                              tmp_path):
    runs = {}
    for name, launch in KD_ONE_AND_TWO_PROCESSES:
        out = tmp_path / name
        proc = run_kdtune("run", *launch, f"output_dir={out}", f"checkpointer.checkpoint_dir={student}",
                          "dataset=chat", f"dataset.data_files={chats}", "dataset.source=jsonl",
                          "max_steps_per_epoch=3", "lr_scheduler.num_warmup_steps=0",
                          "+validation.dataset._component_=chat", f"+validation.dataset.data_files={chats}",
                          "+validation.dataset.source=jsonl", "+validation.every_n_steps=3",
                          "+validation.batch_size=2", *served_args(vllm_server))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = read_metrics(out / "metrics.jsonl")
    assert len(runs["single"]) == len(runs["sharded"]) == 3
    for one, two in zip(runs["single"], runs["sharded"]):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), (key, one, two)
    for key in ("val_loss", "val_kd_loss", "val_kl"):
        assert runs["sharded"][-1][key] == pytest.approx(runs["single"][-1][key], rel=1e-4), key


@pytest.fixture(scope="module")
def mistral_student(tmp_path_factory):
    """A small random student that reads Mistral v0.3's vocabulary: another tokenizer than the teacher's."""
    from kdtune.checkpointing import write_random_checkpoint
    from tests.recipes.conftest import tiny_config

    folder = write_random_checkpoint(dict(tiny_config(2, 64, 4, 2), vocab_size=32768),
                                     tmp_path_factory.mktemp("mistral_student") / "student")
    for f in (ASSETS / "mistral_v3_tokenizer").iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_a_served_teacher_of_another_tokenizer_gives_the_local_teachers_rows_and_loss(vllm_server, chats,
                                                                                      mistral_student, tmp_path):
    """Across tokenizers the server is asked about its own encoding of each sample: its rows at the
    positions the aligned spans read equal the local teacher's, the hybrid loss from them equals the
    loss from the local teacher's top-k, and the KD recipe distills from the server."""
    from kdtune.losses import AlignedTeacher, HybridULDLoss, TeacherTopK
    from kdtune.serving.dataset import ServedTeacherDataset, collate_aligned_topk

    checkpoint = vllm_server["checkpoint"]
    tok, teacher_tok, teacher = kdtune.load_tokenizer(mistral_student), kdtune.load_tokenizer(checkpoint), \
        kdtune.load_model(checkpoint)
    server = ServedTeacher(base_url=vllm_server["base_url"], model=vllm_server["model"], top_k=K,
                           vocab_size=teacher_tok.vocab_size)
    server.check(teacher_tok)
    data = chat_dataset(tok, data_files=str(chats), source="jsonl", teacher_tokenizer=teacher_tok)
    batch = collate_aligned_topk(ServedTeacherDataset(data, server).__getitems__(list(range(4))), tok.pad_id)
    served = batch["teacher_topk"]
    with torch.no_grad():
        log_p = (teacher(batch["teacher_tokens"], return_hidden=True) @ teacher.output_weight.T).log_softmax(-1)
    top = log_p.topk(K)
    after = torch.nn.functional.pad(batch["teacher_tokens"][:, 1:], (0, 1))
    own = log_p.gather(-1, after[..., None])[..., 0]
    fetched = served.token_logprobs != 0
    same = (served.hidden.ids == top.indices).all(-1) & fetched
    assert same.sum() > 0.95 * fetched.sum()
    torch.testing.assert_close(served.hidden.logprobs[same], top.values[same], atol=1e-4, rtol=0)
    torch.testing.assert_close(served.token_logprobs[fetched], own[fetched], atol=1e-4, rtol=0)
    loss = HybridULDLoss()
    loss.setup(tok, teacher_tok)
    student = kdtune.load_model(mistral_student)
    hidden = student(batch["tokens"], return_hidden=True)
    local = AlignedTeacher(TeacherTopK(top.values, top.indices), None, batch["spans"], own)
    heads = (hidden, student.output_weight)
    kd_served = loss(*heads, served, None, batch["labels"], kd_ratio=1.0, num_tokens=100)[1]
    kd_local = loss(*heads, local, None, batch["labels"], kd_ratio=1.0, num_tokens=100)[1]
    assert kd_served.item() == pytest.approx(kd_local.item(), rel=1e-3)
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
                      f"output_dir={tmp_path / 'kd'}", f"checkpointer.checkpoint_dir={mistral_student}", "dataset=chat",
                      f"dataset.data_files={chats}", "dataset.source=jsonl", "batch_size=4", "max_steps_per_epoch=3",
                      *served_args(vllm_server), f"+teacher_tokenizer={checkpoint}", "kd_loss._component_=hybrid_uld")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "kd" / "metrics.jsonl")
    assert len(metrics) == 3 and all(0 < m["kd_loss"] < 50 for m in metrics)
