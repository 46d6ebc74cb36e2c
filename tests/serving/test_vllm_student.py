"""On-policy distillation whose LoRA student samples through vLLM: the adapter is pushed to a real
server as it trains, the samples record the version that wrote them, and the server runs a pushed
adapter as kdtune does (greedy tokens equal). Real engine, real weights; `make test-vllm`."""

import json

import pytest
import torch

import kdtune
from kdtune.checkpointing import load_peft_adapter
from kdtune.datasets import arithmetic_rows
from kdtune.generation import generate
from kdtune.modules.lora import apply_lora, lora_modules
from kdtune.serving import ServedSampler, ServerClient
from kdtune.training import read_metrics
from tests.cli_utils import assert_user_error, run_kdtune
from tests.serving.conftest import small_llama

pytestmark = [pytest.mark.vllm, pytest.mark.real]
LORA = ("+model.lora_attn_modules=[q_proj,v_proj]", "+model.lora_rank=8", "+model.lora_alpha=16",
        "+model.lora_dropout=0.0", "+model.apply_lora_to_mlp=false", "+model.apply_lora_to_output=false")


def gkd_args(tmp_path, name, server, checkpoint, prompts, *extra):
    """GKD of SmolLM2 + LoRA toward a small random teacher (unlike the student, so the adapter moves)."""
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        small_llama(checkpoint, teacher, seed=1)
    return ("run", "on_policy_distillation_single_device", "--config", "tiny/GKD_single_device",
            f"output_dir={tmp_path / name}", f"checkpointer.checkpoint_dir={checkpoint}",
            f"teacher_checkpointer.checkpoint_dir={teacher}", f"dataset.data_files={prompts}",
            "dataset.source=jsonl", "lmbda=1.0", "batch_size=4", "max_steps_per_epoch=3", "generation.max_new_tokens=8",
            "optimizer.lr=0.02", "lr_scheduler.num_warmup_steps=0", *LORA,
            f"+student_server.base_url={server['base_url']}", f"+student_server.model={server['model']}", *extra)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(12, seed=5, max_digits=2)))
    return path


def test_gkd_samples_a_lora_student_through_vllm_and_pushes_its_adapter(vllm_lora_server, prompts, tmp_path):
    checkpoint = vllm_lora_server["checkpoint"]
    proc = run_kdtune(*gkd_args(tmp_path, "gkd", vllm_lora_server, checkpoint, prompts,
                                "+student_server.sync_every_n_steps=2"))
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(tmp_path / "gkd" / "metrics.jsonl")
    assert [m["adapter_version"] for m in metrics] == [1, 1, 3]  # pushed at step 1, then every 2 steps
    assert all(m["generated_length_mean"] > 0 and m["loss"] > 0 for m in metrics)
    assert sorted(p.name for p in (tmp_path / "gkd" / "adapters").iterdir()) == ["v3"]  # older versions deleted

    # The adapter pushed at step 3 changes what the server samples, and the server runs it as kdtune does.
    tok = kdtune.load_tokenizer(checkpoint)
    prompt_ids = [tok.encode(f"What is {i} + {i + 3}?") for i in range(4)]
    client = ServerClient(vllm_lora_server["base_url"])
    client.post("/v1/load_lora_adapter", {"lora_name": "pushed", "lora_path": str(tmp_path / "gkd" / "adapters" / "v3")})

    def served(model):
        body = {"model": model, "max_tokens": 8, "temperature": 0.0, "return_token_ids": True,
                "stop_token_ids": list(tok.eos_ids), "skip_special_tokens": False}
        return [client.post("/v1/completions", {**body, "prompt": p})["choices"][0]["token_ids"] for p in prompt_ids]

    base, adapted = served(vllm_lora_server["model"]), served("pushed")
    assert base != adapted
    student = load_peft_adapter(kdtune.load_model(checkpoint), tmp_path / "gkd" / "adapters" / "v3")
    native = generate(student, prompt_ids, max_new_tokens=8, stop_ids=tok.eos_ids, pad_id=tok.pad_id,
                      vocab_size=tok.vocab_size).completions
    assert [list(map(int, c)) for c in native] == adapted
    client.post("/v1/unload_lora_adapter", {"lora_name": "pushed"})


def test_a_full_weight_student_or_a_server_without_lora_is_one_line(vllm_server, prompts, tmp_path):
    checkpoint = vllm_server["checkpoint"]
    args = [a for a in gkd_args(tmp_path, "full", vllm_server, checkpoint, prompts) if a not in LORA]
    proc = run_kdtune(*args)
    assert_user_error(proc, "student_server: vLLM samples a LoRA student (model.lora_rank)")
    proc = run_kdtune(*gkd_args(tmp_path, "nolora", vllm_server, checkpoint, prompts))  # served without --enable-lora
    assert_user_error(proc, "student_server: the server at", "did not load the student's adapter")


def test_the_servers_log_probabilities_of_its_samples_are_the_adapters(vllm_lora_server, tmp_path):
    """What weights samples from an older adapter (sampled_reverse_kl with sync_every_n_steps > 1):
    the server's log-probability of each sampled token is the pushed adapter's, as kdtune computes it."""
    checkpoint = vllm_lora_server["checkpoint"]
    tok = kdtune.load_tokenizer(checkpoint)
    student = apply_lora(kdtune.load_model(checkpoint), lora_rank=8, lora_alpha=16)
    torch.manual_seed(0)
    for module in lora_modules(student).values():
        torch.nn.init.normal_(module.lora_b.weight, std=0.02)  # an adapter that changes the model
    sampler = ServedSampler(base_url=vllm_lora_server["base_url"], model=vllm_lora_server["model"],
                            adapter_dir=tmp_path / "adapters")
    sampler.check(tok)
    sampler.push(student, 1)
    prompts = [tok.encode(f"What is {i} + {2 * i}?") for i in range(4)]
    completions, logprobs = sampler.sample(prompts, max_new_tokens=8, temperature=1.0, top_k=None, top_p=None,
                                           stop_ids=tok.eos_ids, seed=3)
    sampler.close()
    for prompt, completion, served in zip(prompts, completions, logprobs):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = student(ids)[0, len(prompt) - 1:-1].double()
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(served, dtype=torch.float64), expected, atol=2e-3, rtol=0)


def test_sampled_reverse_kl_from_a_served_teacher_and_older_adapters_runs(vllm_server, vllm_lora_server, prompts,
                                                                          tmp_path):
    checkpoint = vllm_lora_server["checkpoint"]
    args = [a for a in gkd_args(tmp_path, "sampled", vllm_lora_server, checkpoint, prompts,
                                "+student_server.sync_every_n_steps=2", "on_policy_loss=sampled_reverse_kl",
                                "~teacher_checkpointer", f"+teacher_server.base_url={vllm_server['base_url']}",
                                f"+teacher_server.model={vllm_server['model']}")
            if not a.startswith("teacher_checkpointer.")]
    proc = run_kdtune(*args)
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(tmp_path / "sampled" / "metrics.jsonl")
    assert [m["adapter_version"] for m in metrics] == [1, 1, 3]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["kd_loss"]])).all() for m in metrics)
