"""Every CUDA path kdtune claims, checked in one run on a GPU machine (see scripts/gpu_check.sh).

Sections, each timed and recorded in one JSON file (``--out``):

1. ``losses``: the fused loss on the device, for each divergence, against the dense teacher and a
   top-64 one, in float32 and bf16, against the float64 full-logits loss on the CPU (values and
   both gradients);
2. ``recipes``: two steps of each single-device recipe with ``device=<device> dtype=bf16`` on tiny
   models made here (full and LoRA fine-tuning, KD, on-policy, the teacher cache, generation);
3. ``fsdp``: the distributed recipes (KD, LoRA, on-policy) under torchrun on every GPU there is;
4. ``generation``: scripts/bench_generate.py (kdtune against transformers' ``generate``);
5. ``bench``: scripts/bench_kd_step.py at Qwen2-1.5B -> Qwen2-0.5B: the fused step against the
   full-logits form and the chunked one (torchtune's way), tokens/s and peak memory.

``--dry-run`` checks on the CPU that all of it would run: every section at its smallest, the
distributed recipes on 2 processes over gloo. Exit status 1 when a section fails.

    bash scripts/gpu_check.sh [--dry-run] [--out gpu_check.json]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from itertools import product
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 5e-2}  # relative, of values and of gradient norms


def losses(device: str, dry: bool) -> dict:
    from kdtune.config import resolve_component
    from kdtune.losses import LinearKDLoss, TeacherTopK

    tokens, vocab, d_s, d_t, k = (64, 1000, 32, 48, 16) if dry else (1024, 151_936, 896, 1536, 64)
    g = torch.Generator().manual_seed(0)
    base = dict(hidden=torch.randn(1, tokens, d_s, generator=g, dtype=torch.float64),
                weight=torch.randn(vocab, d_s, generator=g, dtype=torch.float64) / d_s**0.5,
                teacher=torch.randn(1, tokens, d_t, generator=g, dtype=torch.float64),
                teacher_weight=torch.randn(vocab, d_t, generator=g, dtype=torch.float64) * 2 / d_t**0.5,
                labels=torch.randint(0, vocab, (1, tokens), generator=g))
    top = (base["teacher"] @ base["teacher_weight"].T).log_softmax(-1).topk(k)
    topk64 = TeacherTopK(top.values, top.indices)
    rows = []
    for name in DIVERGENCES:
        divergence = resolve_component(name, "kd_loss")()
        for teacher_kind in ("dense", "top-k"):
            hidden, weight = (base[x].clone().requires_grad_(True) for x in ("hidden", "weight"))
            teacher, t_weight = (base["teacher"], base["teacher_weight"]) if teacher_kind == "dense" else (topk64, None)
            ce, kd = LinearKDLoss(divergence, form="full")(hidden, weight, teacher, t_weight, base["labels"],
                                                           kd_ratio=0.5, num_tokens=tokens)
            want = [ce.item(), kd.item(), *torch.autograd.grad(0.5 * ce + 0.5 * kd, (hidden, weight))]
            # compile True: the compiled block math where it applies (CE and forward KL; Triton on a GPU)
            for dtype, compile in product((torch.float32, torch.bfloat16), (False,) if dry else (False, True)):
                h, w = (base[x].to(device, dtype).requires_grad_(True) for x in ("hidden", "weight"))
                if teacher_kind == "dense":
                    t, tw = base["teacher"].to(device, dtype), base["teacher_weight"].to(device, dtype)
                else:
                    t, tw = TeacherTopK(topk64.logprobs.to(device, torch.float32), topk64.ids.to(device)), None
                ce, kd = LinearKDLoss(divergence, form="fused", compile=compile)(
                    h, w, t, tw, base["labels"].to(device), kd_ratio=0.5, num_tokens=tokens)
                got = [ce.item(), kd.item(), *(x.double().cpu() for x in torch.autograd.grad(0.5 * ce + 0.5 * kd, (h, w)))]
                errors = [abs(got[0] - want[0]) / abs(want[0]), abs(got[1] - want[1]) / max(abs(want[1]), 1e-12),
                          *(float((x - y).norm() / y.norm()) for x, y in zip(got[2:], want[2:]))]
                rows.append({"divergence": name, "teacher": teacher_kind, "dtype": str(dtype).split(".")[1],
                             "compile_loss": compile,
                             "errors": dict(zip(("ce", "kd", "grad_hidden", "grad_weight"), errors)),
                             "ok": max(errors) <= TOLERANCE[dtype]})
    return {"ok": all(r["ok"] for r in rows), "checks": rows}


def tiny_world(root: Path) -> dict:
    """A ChatML tokenizer, a 2-layer student and a 3-layer teacher (random weights), arithmetic chats."""
    from kdtune.checkpointing import write_random_checkpoint
    from kdtune.datasets import arithmetic_rows, write_arithmetic_jsonl
    from kdtune.tokenization.build import train_chatml_tokenizer

    rows = arithmetic_rows(64, seed=1, max_digits=2)
    alpaca = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
              for r in rows]
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    tokenizer = train_chatml_tokenizer([v for r in alpaca for v in r.values()] * 4 + ["user assistant system"],
                                       root / "tokenizer", vocab_size=300)
    world = {"data": root / "alpaca.json", "chats": write_arithmetic_jsonl(root / "chats.jsonl", 64, seed=1, max_digits=2)}
    for name, layers, init in (("student", 2, 0.05), ("teacher", 3, 0.2)):
        config = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
                  "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
                  "initializer_range": init}
        world[name] = write_random_checkpoint(config, root / name, seed=layers)
        for f in tokenizer.iterdir():
            shutil.copy(f, world[name] / f.name)
    return world


def kdtune_run(*args, nproc: int = 0) -> dict:
    launch = ("--nproc_per_node", str(nproc), "--standalone") if nproc else ()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdtune.cli.main", "run", *launch, *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode:
        out["stderr"] = proc.stderr[-2000:]
    return out


def recipes(device: str, dry: bool, world: dict, out: Path) -> dict:
    run = ("device=" + device, "dtype=bf16", "max_steps_per_epoch=2", "batch_size=2")
    student, teacher = f"checkpointer.checkpoint_dir={world['student']}", f"teacher_checkpointer.checkpoint_dir={world['teacher']}"
    data = f"dataset.data_files={world['data']}"
    runs = {
        "full_finetune_single_device": ("--config", "tiny/full_finetune_single_device", student, data, *run),
        "lora_finetune_single_device": ("--config", "tiny/lora_finetune_single_device", student, data, *run),
        "knowledge_distillation_single_device": ("--config", "tiny/KD_single_device", student, teacher, data, *run),
        "on_policy_distillation_single_device": ("--config", "tiny/GKD_single_device", student, teacher,
                                                 f"dataset.data_files={world['chats']}", *run),
        "cache_teacher_logits": ("--config", "tiny/cache_teacher_logits", teacher, f"tokenizer.path={world['student']}",
                                 data, "device=" + device, "dtype=bf16"),
        "generate": ("--config", "tiny/generate", f"checkpoint_dir={world['student']}", "device=" + device, "dtype=bf16",
                     "max_new_tokens=8"),
    }
    results = {name: kdtune_run(name, *args, f"output_dir={out / name}") for name, args in runs.items()}
    return {"ok": all(r["ok"] for r in results.values()), "runs": results}


def fsdp(device: str, dry: bool, world: dict, out: Path) -> dict:
    nproc = 2 if dry else torch.cuda.device_count()
    run = ("device=" + device, "max_steps_per_epoch=2", "batch_size=2")
    student, teacher = f"checkpointer.checkpoint_dir={world['student']}", f"teacher_checkpointer.checkpoint_dir={world['teacher']}"
    runs = {
        "knowledge_distillation_distributed": ("--config", "tiny/KD_distributed", student, teacher,
                                               f"dataset.data_files={world['data']}", *run),
        "lora_finetune_distributed": ("--config", "tiny/lora_finetune_single_device", student,
                                      f"dataset.data_files={world['data']}", *run),
        "on_policy_distillation_distributed": ("--config", "tiny/GKD_distributed", student, teacher,
                                               f"dataset.data_files={world['chats']}", *run),
    }
    results = {name: kdtune_run(name, *args, f"output_dir={out / name}", nproc=nproc) for name, args in runs.items()}
    return {"ok": all(r["ok"] for r in results.values()), "processes": nproc, "runs": results}


def script(name: str, *args) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True)
    out = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 1), "stdout": proc.stdout[-4000:]}
    if proc.returncode:
        out["stderr"] = proc.stderr[-2000:]
    return out


def generation(device: str, dry: bool) -> dict:
    if dry:
        return script("bench_generate.py", "--device", device, "--layers", "1", "--hidden", "64", "--vocab", "1000",
                      "--batch", "2", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1")
    rows = {}
    for dtype in ("bf16", "fp32"):
        rows[dtype] = script("bench_generate.py", "--device", device, "--dtype", dtype, "--batch", "8",
                             "--prompt-len", "512", "--new-tokens", "512", "--hf-best")
    return {"ok": all(r["ok"] for r in rows.values()), "runs": rows}


def bench(device: str, dry: bool, out: Path) -> dict:
    result = out / "bench_kd_step.json"
    args = ("--shape", "tiny", "--tokens", "512", "--steps", "1", "--vocab", "4096", "--gemm-seconds", "0.2") if dry else \
        ("--shape", "qwen1.5b_to_0.5b", "--tokens", "4096", "--steps", "5", "--dtype", "bf16")
    run = script("bench_kd_step.py", *args, "--device", device, "--forms", "full,chunked,fused", "--json", result)
    if run["ok"]:
        run["rows"] = json.loads(result.read_text())["rows"]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="check on the CPU that every section would run")
    parser.add_argument("--out", default="gpu_check.json", help="the results file")
    parser.add_argument("--sections", default="losses,recipes,fsdp,generation,bench")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --dry-run checks on the CPU that the check would run")
    device = "cpu" if args.dry_run else "cuda"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "dry_run": args.dry_run, "sections": {}}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = tiny_world(root)
        for name in args.sections.split(","):
            start = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                result = {"losses": lambda: losses(device, args.dry_run),
                          "recipes": lambda: recipes(device, args.dry_run, world, root / "recipes"),
                          "fsdp": lambda: fsdp(device, args.dry_run, world, root / "fsdp"),
                          "generation": lambda: generation(device, args.dry_run),
                          "bench": lambda: bench(device, args.dry_run, root)}[name]()
            except Exception:  # recorded, and the other sections still run
                result = {"ok": False, "error": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["sections"][name] = result
            print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: {'all passed' if report['ok'] else 'FAILED'} in {report['seconds']} s; {args.out}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
