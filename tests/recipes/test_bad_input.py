"""Bad input across the recipes: each case is refused with exit status 2 and one `kdtune: error:` line
naming the key, file or row, no traceback, nothing of an earlier run overwritten, and the output
folder left usable by the next run. Most cases run the recipe in this process (they stop before any
weight loads, which is the point); those that need a real process — a full disk, a lock held by
another run, a resume — run through the CLI."""

import hashlib
import json
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kdtune.checkpointing import latest_checkpoint
from tests.cli_utils import REPO, assert_user_error, run_kdtune
from tests.recipes.conftest import base_overrides, kd_overrides

ENV = {"OMP_NUM_THREADS": "1"}
RECIPE = {"full": ("full_finetune_single_device", "tiny/full_finetune_single_device", base_overrides),
          "lora": ("lora_finetune_single_device", "tiny/lora_finetune_single_device", base_overrides),
          "kd": ("knowledge_distillation_single_device", "tiny/KD_single_device", kd_overrides),
          "kd_full": ("knowledge_distillation_single_device", "tiny/KD_full_single_device", kd_overrides),
          "gkd": ("on_policy_distillation_single_device", "tiny/GKD_single_device", kd_overrides),
          "generate": ("generate", "tiny/generate", lambda world, out: [
              f"checkpoint_dir={world['student']}", f"tokenizer.path={world['student']}", f"output_dir={out}"]),
          "cache": ("cache_teacher_logits", "tiny/cache_teacher_logits", lambda world, out: [
              f"output_dir={out}", f"teacher_checkpointer.checkpoint_dir={world['teacher']}",
              f"tokenizer.path={world['student']}", f"dataset.data_files={world['data']}"]),
          "eval": ("eleuther_eval", "tiny/eval", lambda world, out: [
              f"checkpoint_dir={world['student']}", f"tokenizer.path={world['student']}", f"output_dir={out}"])}


@pytest.fixture(scope="module")
def files(world):
    """Data files a tired user might pass."""
    root = world["root"] / "bad_input"
    root.mkdir(exist_ok=True)
    rows = json.loads(world["data"].read_text())
    long_prompt = " ".join(f"{i} plus {i}" for i in range(300))
    out = {
        "latin1": root / "latin1.jsonl", "not_json": root / "broken.json", "empty": root / "empty.json",
        "long": root / "long.json", "some_long": root / "some_long.json", "chats": root / "chats.jsonl",
        "missing": root / "nowhere.json", "a_file": root / "notes.txt",
    }
    out["latin1"].write_bytes('{"instruction": "caf\u00e9 1 + 1", "input": "", "output": "2"}\n'.encode("latin-1"))
    out["not_json"].write_text('[{"instruction": "1 + 1", "output": "2"},')
    out["empty"].write_text("[]")
    out["long"].write_text(json.dumps([{"instruction": long_prompt, "input": "", "output": "2"}] * 8))
    out["some_long"].write_text(json.dumps(rows[:16] + [{"instruction": long_prompt, "input": "", "output": "2"}]))
    out["chats"].write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}) + "\n"
        for r in rows))
    out["a_file"].write_text("my notes")
    return out


def other_teacher(world, tmp_path):
    """The teacher with two token ids swapped in its tokenizer: the same tokens, another tokenizer."""
    other = tmp_path / "other_teacher"
    shutil.copytree(world["teacher"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    return other


VALIDATION = ("+validation.every_n_steps=0", "+validation.dataset._component_=alpaca",
              "+validation.dataset.data_files=x.json")
# (case, recipe, overrides (with {data}, {chats}, {other_teacher} and files[...] filled in), what the line names)
CASES = [
    ("batch_size_zero", "full", ["batch_size=0"], "batch_size: expected a positive integer, got 0"),
    ("batch_size_fraction", "kd", ["batch_size=2.5"], "batch_size: expected a positive integer, got 2.5"),
    ("batch_size_text", "lora", ["batch_size=four"], "batch_size: expected a positive integer, got 'four'"),
    ("accumulation_zero", "kd", ["gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    ("epochs_fraction", "full", ["epochs=1.5"], "epochs: expected a positive integer, got 1.5"),
    ("epochs_zero", "gkd", ["epochs=0"], "epochs"),
    ("kd_ratio_text", "kd", ["kd_ratio=abc"], "kd_ratio: expected a number in [0, 1], got 'abc'"),
    ("kd_ratio_above_one", "kd_full", ["kd_ratio=1.5"], "kd_ratio"),
    ("clip_negative", "kd", ["clip_grad_norm=-1"], "clip_grad_norm: expected a number > 0 or null, got -1"),
    ("lr_negative", "full", ["optimizer.lr=-0.001"], "optimizer.lr: expected a number >= 0"),
    ("lr_text", "kd", ["optimizer.lr=fast"], "optimizer.lr"),
    ("weight_decay_negative", "lora", ["optimizer.weight_decay=-1"], "optimizer.weight_decay"),
    ("warmup_negative", "full", ["lr_scheduler.num_warmup_steps=-5"], "lr_scheduler.num_warmup_steps"),
    ("max_steps_zero", "kd", ["max_steps_per_epoch=0"], "max_steps_per_epoch"),
    ("save_every_negative", "full", ["save_every_n_steps=-3"], "save_every_n_steps"),
    ("log_every_zero", "kd", ["log_every_n_steps=0"], "log_every_n_steps"),
    ("loss_form_unknown", "kd", ["loss_form=sparse"], "loss_form: expected one of fused, chunked, full"),
    ("chunk_size_zero", "full", ["loss_chunk_size=0"], "loss_chunk_size"),
    ("dtype_unknown", "kd", ["dtype=fp8"], "dtype: expected one of"),
    ("device_unknown", "full", ["device=tpu"], "device: expected auto, cpu, cuda or cuda:N"),
    ("seed_negative", "kd", ["seed=-1"], "seed"),
    ("shuffle_not_bool", "full", ["shuffle=maybe"], "shuffle: expected true or false"),
    ("unknown_setting", "kd", ["+kd_ratioo=0.5"], "kd_ratioo: not a setting this recipe reads; did you mean 'kd_ratio'"),
    ("temperature_zero", "kd", ["kd_loss.temperature=0"], "kd_loss: loss temperature"),
    ("jsd_beta", "kd", ["kd_loss=jsd", "+kd_loss.beta=2"], "kd_loss: loss beta"),
    ("teacher_quantize", "kd", ["teacher.quantize=int3"], "teacher.quantize"),
    ("lora_rank_too_large", "lora", ["model.lora_rank=100"], "lora_rank: 100 exceeds the smaller side of"),
    ("lora_rank_zero", "kd", ["model.lora_rank=0"], "lora_rank"),
    ("lmbda_above_one", "gkd", ["dataset.data_files={chats}", "lmbda=2"], "lmbda: expected a number in [0, 1]"),
    ("max_new_tokens_zero", "gkd", ["dataset.data_files={chats}", "generation.max_new_tokens=0"],
     "generation.max_new_tokens"),
    ("generation_typo", "gkd", ["dataset.data_files={chats}", "+generation.temprature=1"],
     "generation.temprature: not a setting"),
    ("validation_every_zero", "kd", list(VALIDATION), "validation.every_n_steps"),
    ("output_dir_is_a_file", "full", ["output_dir={a_file}"], "output_dir: "),
    ("output_dir_read_only", "kd", ["output_dir=/proc/sys/kdtune_run"], "output_dir: cannot write to '/proc/sys'"),
    ("data_not_utf8", "full", ["dataset.data_files={latin1}"], "not UTF-8 text"),
    ("data_missing", "kd", ["dataset.data_files={missing}"], "data_files: no such file"),
    ("data_not_json", "lora", ["dataset.data_files={not_json}"], "not valid JSON"),
    ("data_empty", "full", ["dataset.data_files={empty}"], "no samples"),
    ("data_smaller_than_a_step", "kd", ["batch_size=128"], "fewer than one optimizer step needs"),
    ("every_sample_untrained", "full", ["dataset.max_seq_len=12"], "every label is masked"),
    ("untrained_sample_refused", "kd", ["dataset.data_files={some_long}", "dataset.max_seq_len=64",
                                        "+dataset.drop_untrained=false"],
     "some_long.json row 17 (1-based): no token of this sample is trained"),
    ("longer_than_positions", "full", ["dataset.data_files={long}", "dataset.max_seq_len=4096",
                                       "tokenizer.max_seq_len=4096"], "is past max_position_embeddings=512"),
    ("longer_than_positions_by_sample", "full", ["dataset.data_files={long}", "dataset.max_seq_len=null",
                                                 "tokenizer.max_seq_len=null"], "exceeds max_position_embeddings=512"),
    ("checkpoint_missing", "kd", ["checkpointer.checkpoint_dir={missing}"], "nowhere.json"),
    ("teacher_tokenizer_differs", "kd", ["teacher_checkpointer.checkpoint_dir={other_teacher}"],
     "different tokenizers: token id"),
    ("max_seq_len_zero", "kd", ["dataset.max_seq_len=0"], "dataset.max_seq_len: expected a positive integer or null, "
                                                          "got 0"),
    ("max_seq_len_negative", "full", ["dataset.max_seq_len=-5"], "dataset.max_seq_len: expected a positive integer"),
    ("tokenizer_max_seq_len_zero", "lora", ["tokenizer.max_seq_len=0"], "tokenizer.max_seq_len: expected a positive"),
    ("validation_max_seq_len_zero", "kd", ["+validation.every_n_steps=1", "+validation.dataset._component_=alpaca",
                                           "+validation.dataset.data_files=x.json", "+validation.dataset.max_seq_len=0"],
     "validation.dataset.max_seq_len: expected a positive integer"),
    ("num_cycles_negative", "full", ["+lr_scheduler.num_cycles=-1"], "lr_scheduler.num_cycles: expected a number >= 0"),
    ("lora_dropout_one", "lora", ["model.lora_dropout=1.0"], "model.lora_dropout: must be in [0, 1)"),
    ("lora_option_without_rank", "kd_full", ["+model.apply_lora_to_mlp=false"],
     "model.apply_lora_to_mlp: a LoRA option, but model.lora_rank is not set"),
    ("teacher_vocab_check_unknown", "kd", ["teacher_vocab_check=trust"],
     "teacher_vocab_check: expected one of tokenizer, padding, got 'trust'"),
    ("teacher_larger_without_tokenizer", "kd", ["teacher_checkpointer.checkpoint_dir={padded_teacher}"],
     "teacher_vocab_check: the teacher"),
    ("gkd_teacher_larger_without_tokenizer", "gkd", ["dataset.data_files={chats}",
                                                     "teacher_checkpointer.checkpoint_dir={padded_teacher}"],
     "has 1,344 embedding rows and the student's side 320"),
    ("cache_teacher_larger_without_tokenizer", "cache", ["teacher_checkpointer.checkpoint_dir={padded_teacher}"],
     "set teacher_vocab_check: padding"),
    ("teacher_too_large", "kd", ["teacher_checkpointer.checkpoint_dir={huge_teacher}"],
     "memory: this run needs at least"),
    ("cache_teacher_too_large", "cache", ["teacher_checkpointer.checkpoint_dir={huge_teacher}"],
     "quantize the teacher (teacher.quantize: nf4)"),
    ("cache_and_teacher", "kd", ["+teacher_logits_cache={missing}"], "teacher_logits_cache and teacher_checkpointer"),
    ("gkd_from_a_cache", "gkd", ["dataset.data_files={chats}", "~teacher_checkpointer", "+teacher_logits_cache={missing}"],
     "on-policy distillation grades the student's own samples"),
    ("server_and_teacher", "kd", ["+teacher_server.base_url=http://127.0.0.1:9/v1", "+teacher_server.model=t"],
     "teacher_server and teacher_checkpointer are both set"),
    ("server_without_model", "kd", ["~teacher_checkpointer", "+teacher_server.base_url=http://127.0.0.1:9/v1"],
     "teacher_server.model: required"),
    ("server_top_k_zero", "kd_full", ["~teacher_checkpointer", "+teacher_server.base_url=http://127.0.0.1:9/v1",
                                      "+teacher_server.model=t", "+teacher_server.top_k=0"],
     "teacher_server.top_k: expected a positive integer"),
    ("server_unreachable", "kd", ["~teacher_checkpointer", "+teacher_server.base_url=http://127.0.0.1:9/v1",
                                  "+teacher_server.model=t", "+teacher_server.retries=0"],
     "teacher_server: cannot reach http://127.0.0.1:9/v1/models"),
    ("server_hidden_states", "kd", ["~teacher_checkpointer", "+teacher_server.base_url=http://127.0.0.1:9/v1",
                                    "+teacher_server.model=t", "+hidden_state_loss._component_=cosine_hidden_loss"],
     "hidden_state_loss: a served teacher gives log-probabilities"),
    ("gkd_server_seq_kd", "gkd", ["dataset.data_files={chats}", "~teacher_checkpointer", "seq_kd=true",
                                  "+teacher_server.base_url=http://127.0.0.1:9/v1", "+teacher_server.model=t",
                                  "+teacher_server.retries=0"], "seq_kd: the teacher writes completions with kdtune's sampler"),
    ("gkd_stale_adapters_hot", "gkd", ["dataset.data_files={chats}", "on_policy_loss=sampled_reverse_kl",
                                       "generation.temperature=0.7", "+student_server.base_url=http://127.0.0.1:9/v1",
                                       "+student_server.model=t", "+student_server.sync_every_n_steps=4"],
     "student_server.sync_every_n_steps: samples from an adapter older than the student"),
    ("cache_server_unreachable", "cache", ["~teacher_checkpointer", "+teacher_server.base_url=http://127.0.0.1:9/v1",
                                           "+teacher_server.model=t", "+teacher_server.top_k=64",
                                           "+teacher_server.retries=0"], "teacher_server: cannot reach"),
    ("cache_server_top_k_differs", "cache", ["~teacher_checkpointer", "+teacher_server.base_url=http://127.0.0.1:9/v1",
                                             "+teacher_server.model=t"], "top_k: 64 is not teacher_server.top_k (20)"),
    ("cache_server_and_teacher", "cache", ["+teacher_server.base_url=http://127.0.0.1:9/v1",
                                           "+teacher_server.model=t", "+teacher_server.top_k=64"],
     "teacher_server and teacher_checkpointer are both set"),
    ("generate_past_positions", "generate", ["max_new_tokens=100000"], "exceeds max_position_embeddings=512"),
    ("generate_file_not_utf8", "generate", ["prompt=null", "messages_file={latin1}"], "not UTF-8 text"),
    ("generate_temperature_negative", "generate", ["temperature=-1"], "temperature: expected a number >= 0"),
    ("generate_two_prompt_kinds", "generate", ["messages_file={chats}"], "set exactly one of them"),
    ("cache_top_k_zero", "cache", ["top_k=0"], "top_k: expected a positive integer"),
    ("cache_logprob_dtype", "cache", ["logprob_dtype=int8"], "logprob_dtype: expected one of q8, fp16, fp32"),
    ("cache_batch_size_zero", "cache", ["batch_size=0"], "batch_size"),
    ("eval_batch_size_zero", "eval", ["batch_size=0"], "batch_size"),
    ("eval_limit_negative", "eval", ["limit=-1"], "limit: expected a number > 0 or null"),
    ("eval_unknown_setting", "eval", ["+num_fewshots=2"], "num_fewshots: not a setting this recipe reads"),
]


def padded_teacher(world, tmp_path):
    """A teacher with 1,024 more embedding rows than the student (trained-looking, not zero) and no
    tokenizer files: nothing shows that those rows are padding of the same tokenizer."""
    from kdtune.checkpointing import write_random_checkpoint
    from tests.recipes.conftest import VOCAB, tiny_config

    return write_random_checkpoint({**tiny_config(3, 64, 4, 2, init=0.2), "vocab_size": VOCAB + 1024},
                                   tmp_path / "padded_teacher", seed=1)


def huge_teacher(world, tmp_path):
    """A config.json of a 64-layer, 16,384-wide teacher (about 200 billion weights, none on disk)
    beside the world's tokenizer: it cannot fit, and nothing may try to load it."""
    from tests.recipes.conftest import VOCAB, tiny_config

    folder = tmp_path / "huge_teacher"
    shutil.copytree(world["teacher"], folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = {**tiny_config(64, 16384, 128, 8), "vocab_size": VOCAB, "intermediate_size": 53248}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fill(arg, world, files, tmp_path):
    values = {"chats": files["chats"], **files}
    if "{other_teacher}" in arg:
        values["other_teacher"] = other_teacher(world, tmp_path)
    if "{huge_teacher}" in arg:
        values["huge_teacher"] = huge_teacher(world, tmp_path)
    if "{padded_teacher}" in arg:
        values["padded_teacher"] = padded_teacher(world, tmp_path)
    return arg.format(**values) if "{" in arg else arg


def snapshot(folder) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run_in_process(recipe: str, argv: list[str], capsys) -> tuple[int, str]:
    main = runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"))["main"]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case, kind, overrides, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, kind, overrides, fragment, world, files, tmp_path, capsys):
    recipe, config, base = RECIPE[kind]
    out = tmp_path / "out"
    argv = ["--config", config, *base(world, out), *(fill(a, world, files, tmp_path) for a in overrides)]
    code, err = run_in_process(recipe, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kdtune: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    if case != "output_dir_is_a_file":
        assert not out.exists()  # nothing of a refused run is written; the next run starts clean


def test_a_disk_that_fills_up_during_a_save(world, tmp_path):
    """The first checkpoint hits the file-size limit: one line, the partial folder removed, and a
    resume afterwards (there is no checkpoint yet) runs the whole training."""
    out = tmp_path / "full"
    recipe, config, base = RECIPE["full"]

    def limit_file_size():  # a disk with 200 KB free: smaller than the student's weights
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "kdtune.cli.main", "run", recipe, "--config", config,
                           *base(world, out), "max_steps_per_epoch=3", "save_every_n_steps=2"],
                          env={**os.environ, **ENV}, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert_user_error(proc, f"{out}/step_2: cannot be written", "partial folder was removed")
    assert not [p for p in out.iterdir() if p.name.startswith(".step_2")] and latest_checkpoint(out) is None
    again = run_kdtune("run", recipe, "--config", config, *base(world, out), "max_steps_per_epoch=3",
                       "save_every_n_steps=2", "resume_from_checkpoint=true", env=ENV)
    assert again.returncode == 0, again.stderr
    assert (out / "epoch_1" / "config.json").is_file() and (out / "metrics.previous.jsonl").is_file()


def test_a_disk_that_fills_up_keeps_the_previous_checkpoint(world, tmp_path):
    """A 2 MB disk (tmpfs) holds the first checkpoint (1.2 MB) but not the second: the second save is
    one line, leaves nothing, and the first stays loadable; with room again, a resume finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = disk / "run"
        recipe, config, base = RECIPE["full"]
        args = ("run", recipe, "--config", config, *base(world, out), "max_steps_per_epoch=4", "save_every_n_steps=2")
        assert_user_error(run_kdtune(*args, env=ENV), f"{out}/epoch_1: cannot be written (No space left on device)",
                          "the checkpoints written before it are intact")
        assert [p.name for p in out.iterdir() if p.name.startswith(("step_", "epoch_", ".epoch_"))] == ["step_2"]
        import kdtune

        kdtune.load_model(out / "step_2")  # whole and loadable
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = run_kdtune(*args, "resume_from_checkpoint=true", env=ENV)
        assert again.returncode == 0, again.stderr
        assert latest_checkpoint(out).name == "epoch_1"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.fixture(scope="module")
def finished_run(world, tmp_path_factory):
    """A finished KD run to resume: 2 epochs of 2 steps, a checkpoint every step."""
    out = tmp_path_factory.mktemp("finished") / "kd"
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, out), "epochs=2", "max_steps_per_epoch=2", "save_every_n_steps=1", env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("change, fragment", [
    ("batch_size=2", "batch_size was 4 in the run being resumed and is 2 now"),
    ("kd_loss=jsd", "kd_loss was"),
    ("kd_ratio=0.9", "kd_ratio was 0.5"),
    ("dataset.data_files={chats}", "dataset was"),
    ("model.lora_dropout=0.1", "model was"),
    ("dataset.max_seq_len=128", "dataset was"),
])
def test_a_resume_that_changes_what_defines_the_run_is_refused(change, fragment, world, files, finished_run, tmp_path):
    out = tmp_path / "kd"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, out), "epochs=2", "max_steps_per_epoch=2", "save_every_n_steps=1",
                      "resume_from_checkpoint=true", change.format(chats=files["chats"]))
    assert_user_error(proc, "resume_from_checkpoint: ", fragment, "resume_allow_changes")
    assert snapshot(out) == before  # config.yaml of the original run included


def test_a_resume_may_add_epochs_and_change_the_lr(world, finished_run, tmp_path):
    out = tmp_path / "kd"
    shutil.copytree(finished_run, out)
    config = (out / "config.yaml").read_text()
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, out), "epochs=3", "max_steps_per_epoch=2", "save_every_n_steps=1",
                      "resume_from_checkpoint=true", "optimizer.lr=0.002", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert (out / "epoch_3").is_dir() and (out / "config.yaml").read_text() == config
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # The new base lr under this run's schedule from step 5 on: all 6 steps lie in the tiny config's
    # 10-step linear warmup, so step s runs at (s - 1) / 10 of it.
    for step in (5, 6):
        assert metrics[step - 1]["lr"] == pytest.approx(0.002 * (step - 1) / 10)
    # and the other way round: an intended change of what defines the run, allowed by name
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                      *kd_overrides(world, out), "epochs=4", "max_steps_per_epoch=2", "save_every_n_steps=1",
                      "resume_from_checkpoint=true", "kd_ratio=0.9", "resume_allow_changes=[kd_ratio]", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["kd_ratio"] == 0.9


def test_a_second_run_on_a_folder_in_use_is_refused(world, tmp_path):
    out = tmp_path / "busy"
    recipe, config, base = RECIPE["full"]
    first = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", "run", recipe, "--config", config,
                              *base(world, out), "epochs=200", "batch_size=2"],
                             env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_kdtune("run", recipe, "--config", config, *base(world, out), "epochs=200", "batch_size=2",
                            "resume_from_checkpoint=true")
        assert_user_error(second, f"'{out}' is in use by another run (pid {first.pid})")
    finally:
        first.kill()
        first.wait()
    # The lock dies with its process: the folder is free again.
    third = run_kdtune("run", recipe, "--config", config, *base(world, out), "epochs=1", "batch_size=2",
                       "resume_from_checkpoint=true", env=ENV)
    assert third.returncode == 0, third.stderr


def test_outputs_of_generate_and_eval_are_never_overwritten(world, tmp_path):
    out = tmp_path / "gen"
    args = ("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={world['student']}",
            f"tokenizer.path={world['student']}", f"output_dir={out}", "max_new_tokens=4")
    assert run_kdtune(*args).returncode == 0
    before = snapshot(out)
    assert_user_error(run_kdtune(*args), "holds an earlier run's generations")
    assert snapshot(out) == before
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{}")
    proc = run_kdtune("run", "eleuther_eval", "--config", "tiny/eval", f"checkpoint_dir={world['student']}",
                      f"tokenizer.path={world['student']}", f"output_dir={tmp_path / 'eval'}")
    assert_user_error(proc, "holds an earlier run's results.json")
    assert (tmp_path / "eval" / "results.json").read_text() == "{}"


def test_a_cache_of_a_teacher_with_another_tokenizer_is_refused(world, tmp_path):
    proc = run_kdtune("run", "cache_teacher_logits", "--config", "tiny/cache_teacher_logits",
                      f"output_dir={tmp_path / 'cache'}", f"teacher_checkpointer.checkpoint_dir={other_teacher(world, tmp_path)}",
                      f"tokenizer.path={world['student']}", f"dataset.data_files={world['data']}")
    assert_user_error(proc, "different tokenizers")
    assert not (tmp_path / "cache").exists()


def test_a_teacher_trusted_as_padded_distills_and_its_cache_asks_the_same_trust(world, tmp_path):
    padded, trust = padded_teacher(world, tmp_path), "teacher_vocab_check=padding"
    kd = ("run", "knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
          "max_steps_per_epoch=1")
    proc = run_kdtune(*kd, *kd_overrides(world, tmp_path / "kd"), f"teacher_checkpointer.checkpoint_dir={padded}",
                      trust, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cache = tmp_path / "cache"
    proc = run_kdtune("run", "cache_teacher_logits", "--config", "tiny/cache_teacher_logits", f"output_dir={cache}",
                      f"teacher_checkpointer.checkpoint_dir={padded}", f"tokenizer.path={world['student']}",
                      f"dataset.data_files={world['data']}", "batch_size=16", trust, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_cache = (*kd, *base_overrides(world, tmp_path / "from_cache"), "~teacher_checkpointer",
                  f"+teacher_logits_cache={cache}")
    assert_user_error(run_kdtune(*from_cache, env=ENV), f"teacher_vocab_check: the cache in '{cache}' was made with "
                      f"teacher_vocab_check: padding", "1,344 embedding rows")
    assert not (tmp_path / "from_cache").exists()
    proc = run_kdtune(*from_cache, trust, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_samples_longer_than_max_seq_len_are_counted_in_one_warning(world, files, tmp_path):
    recipe, config, base = RECIPE["full"]
    proc = run_kdtune("run", recipe, "--config", config, *base(world, tmp_path / "out"), "dataset.max_seq_len=24",
                      "batch_size=2", "max_steps_per_epoch=1", env=ENV)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("kdtune: warning:")]
    assert len(warnings) == 1, proc.stderr
    counted = re.search(r": (\d+) of 64 samples are longer than max_seq_len=24 and are cut there", warnings[0])
    assert counted, warnings[0]
    import kdtune
    from kdtune.datasets import alpaca_dataset

    whole = alpaca_dataset(kdtune.load_tokenizer(world["student"]), data_files=str(world["data"]), max_seq_len=None)
    assert int(counted.group(1)) == sum(len(s["tokens"]) > 24 for s in whole) > 0


def test_dropped_samples_are_counted_in_one_warning(world, files, tmp_path):
    recipe, config, base = RECIPE["full"]
    proc = run_kdtune("run", recipe, "--config", config, *base(world, tmp_path / "out"),
                      f"dataset.data_files={files['some_long']}", "dataset.max_seq_len=64", "batch_size=2",
                      "max_steps_per_epoch=1", env=ENV)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("kdtune: warning:")]
    assert len(warnings) == 1 and "dropped 1 of 17 samples with no trained token" in warnings[0], proc.stderr


def test_a_bad_setting_under_torchrun_is_one_line_from_one_process(world, tmp_path):
    proc = run_kdtune("run", "--nproc_per_node", "2", "--standalone", "knowledge_distillation_distributed", "--config",
                      "tiny/KD_distributed", *kd_overrides(world, tmp_path / "out"), "kd_ratio=abc", env=ENV)
    assert_user_error(proc, "kd_ratio: expected a number in [0, 1], got 'abc'")
    assert not (tmp_path / "out").exists()


def test_checkpoints_get_the_permissions_the_umask_gives(world, tmp_path):
    out = tmp_path / "run"
    recipe, config, base = RECIPE["full"]
    proc = subprocess.run([sys.executable, "-m", "kdtune.cli.main", "run", recipe, "--config", config,
                           *base(world, out), "max_steps_per_epoch=1"], env={**os.environ, **ENV},
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out / "epoch_1", *(out / "epoch_1").iterdir()]}
    assert modes["epoch_1"] == 0o755 and modes["recipe_state.pt"] == 0o644 and modes["model.safetensors"] == 0o644
