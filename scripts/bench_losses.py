"""Benchmark the distillation loss forms at an output head (default Qwen2-0.5B's), softcapped or not.

Each (form, token count, weight mode) runs in its own subprocess, so peak memory is that form's
alone: peak RSS growth over the state after setup on CPU (the kernel's VmHWM, reset after setup
and after returning freed memory to the system),
``torch.cuda.max_memory_allocated`` growth on CUDA, the larger of the two calls'. Time is one
forward+backward, cold (the process's first call) and warm (its second). Ratios are against the
full-logits form measured in the same run.

The student head is Qwen2-0.5B's (V = 151,936, hidden 896), the teacher's Qwen2-1.5B's (hidden
1536), all bf16. "frozen" leaves the student's output weight without gradient (LoRA), "trainable"
also computes it (full fine-tuning, tied embeddings). Every form computes
``0.5 * CE + 0.5 * divergence`` from hidden states, so the output projections are included.

``--vocab``, ``--hidden STUDENT TEACHER`` and ``--softcap STUDENT TEACHER`` set another head: Gemma 3
1B/4B is ``--vocab 262144 --hidden 1152 2560``, and ``--softcap 30 30`` caps both models' logits at 30
(Gemma 2's final-logit softcapping) in every kdtune form (torchtune and TRL have no cap: their rows
are skipped then).

    python scripts/bench_losses.py [--tokens 2048 8192] [--weights frozen trainable] [--forms full fused]

On 2 CPU cores the defaults take 10+ minutes (the chunked form at 8,192 tokens dominates); the
full form is skipped where it would not fit in memory.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

from kdtune.losses import CrossEntropyLoss, FusedLinearKDLoss
from kdtune.losses.fused import DEFAULT_CHUNK_SIZE
from kdtune.losses.divergences import ForwardKLLoss, GeneralizedJSDLoss, ReverseKLLoss, TVDLoss
from kdtune.modules.softcap import softcap

VOCAB, D_STUDENT, D_TEACHER = 151_936, 896, 1536  # the defaults of --vocab and --hidden
OUTPUT_CHUNKS = 8  # how many sequence chunks the chunked form gets, as torchtune's recipes use
DIVERGENCES = {"forward_kl": ForwardKLLoss, "reverse_kl": ReverseKLLoss, "jsd": GeneralizedJSDLoss, "tvd": TVDLoss}
FORMS = ["full", "chunked", "fused", "torchtune", "trl"]
GiB = 2**30


def make_inputs(tokens: int, trainable: bool, device: str, vocab: int, hidden: tuple[int, int]) -> dict:
    g = torch.Generator(device).manual_seed(0)
    bf16 = {"dtype": torch.bfloat16, "device": device, "generator": g}
    labels = torch.randint(0, vocab, (1, tokens), generator=g, device=device)
    labels[0, torch.arange(0, tokens, 32, device=device)] = -100  # some ignored positions
    return {
        "hidden": torch.randn(1, tokens, hidden[0], **bf16).requires_grad_(),
        "weight": (torch.randn(vocab, hidden[0], **bf16) * 0.02).requires_grad_(trainable),
        "t_hidden": torch.randn(1, tokens, hidden[1], **bf16),
        "t_weight": torch.randn(vocab, hidden[1], **bf16) * 0.02,
        "labels": labels,
    }


def step(form: str, x: dict, divergence, chunk_size: int, caps: tuple) -> None:
    """One forward+backward of ``0.5 * CE + 0.5 * KD`` from hidden states, each model's logits capped."""
    if form == "fused":
        fused = FusedLinearKDLoss(divergence, chunk_size=chunk_size, student_softcap=caps[0], teacher_softcap=caps[1])
        ce, kd = fused(x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], x["labels"], kd_ratio=0.5)
        (0.5 * ce + 0.5 * kd).backward()
        return
    split = -(-x["hidden"].shape[1] // OUTPUT_CHUNKS)
    if form in ("full", "trl"):
        student = softcap(x["hidden"] @ x["weight"].T, caps[0])
        with torch.no_grad():
            teacher = softcap(x["t_hidden"] @ x["t_weight"].T, caps[1])
    else:
        student = [softcap(h @ x["weight"].T, caps[0]) for h in x["hidden"].split(split, dim=1)]
        with torch.no_grad():
            teacher = [softcap(h @ x["t_weight"].T, caps[1]) for h in x["t_hidden"].split(split, dim=1)]
    ce = CrossEntropyLoss()(student, x["labels"])
    if form in ("full", "chunked"):
        kd = divergence(student, teacher, x["labels"])
    elif form == "torchtune":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        kd = ForwardKLWithChunkedOutputLoss(num_output_chunks=len(student))(student, teacher, x["labels"])
    else:  # trl
        from trl import GKDTrainer

        kd = GKDTrainer.generalized_jsd_loss(student, teacher, x["labels"], beta=0.5)  # JSD, whatever --divergence
    (0.5 * ce + 0.5 * kd).backward()


def peak_reset(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the previous call's freed memory back, so it is not reused unseen
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    return _vm("VmHWM")


def peak_read(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _vm("VmHWM")


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def worker(args) -> None:
    """Two forward+backward passes in a fresh process: cold (the first call: allocations, first
    touches of memory, one-time setup) and warm (the second), each with its peak memory growth."""
    divergence = DIVERGENCES[args.divergence]()
    x = make_inputs(args.tokens[0], args.weights[0] == "trainable", args.device, args.vocab, tuple(args.hidden))
    caps = tuple(args.softcap) if args.softcap else (None, None)
    result = {}
    for call in ("cold", "warm"):
        x["hidden"].grad = x["weight"].grad = None
        base = peak_reset(args.device)
        start = time.perf_counter()
        step(args.form, x, divergence, args.chunk_size, caps)
        if args.device == "cuda":
            torch.cuda.synchronize()
        result[call] = time.perf_counter() - start
        result[f"{call}_peak_extra"] = peak_read(args.device) - base
    result["peak_extra"] = max(result["cold_peak_extra"], result["warm_peak_extra"])
    print(json.dumps(result))


def importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def available_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024


def run(form: str, tokens: int, weights: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", form, "--tokens", str(tokens), "--weights", weights,
           "--divergence", args.divergence, "--chunk-size", str(args.chunk_size), "--device", args.device,
           "--vocab", str(args.vocab), "--hidden", *map(str, args.hidden), *(["--softcap", *map(str, args.softcap)]
                                                                              if args.softcap else [])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"note": f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--weights", nargs="+", choices=["frozen", "trainable"], default=["frozen"])
    p.add_argument("--forms", nargs="+", choices=FORMS, default=FORMS)
    p.add_argument("--divergence", choices=sorted(DIVERGENCES), default="forward_kl")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per chunk of the fused form")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary (output rows) of both heads")
    p.add_argument("--hidden", type=int, nargs=2, default=[D_STUDENT, D_TEACHER], metavar=("STUDENT", "TEACHER"))
    p.add_argument("--softcap", type=float, nargs=2, metavar=("STUDENT", "TEACHER"),
                   help="cap each model's final logits (Gemma 2: 30 30)")
    p.add_argument("--worker", choices=FORMS, dest="form", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.form:
        return worker(args)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# torch {torch.__version__}, device {args.device}"
          f" ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{cpu}, {os.cpu_count()} cores'}),"
          f" divergence {args.divergence}, fused chunk_size {args.chunk_size}, {OUTPUT_CHUNKS} output chunks,"
          f" vocab {args.vocab}, hidden {args.hidden[0]}/{args.hidden[1]},"
          f" softcap {'/'.join(f'{c:g}' for c in args.softcap) if args.softcap else 'off'}")
    print("| tokens | student weight | form | cold s | warm s | cold vs full | warm vs full | peak extra GiB "
          "| memory vs full |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    notes = []
    per_token = {}  # (weights, form) -> peak bytes per token measured at the first size
    for tokens in args.tokens:
        for weights in args.weights:
            baseline = None
            for form in args.forms:
                if form in ("torchtune", "trl") and args.softcap:
                    note = f"{form} has no logit softcapping: its row is skipped"
                    notes += [note] if note not in notes else []
                    continue
                if form in ("torchtune", "trl") and not importable(form):
                    note = f"{form} is not importable: its row is skipped"
                    notes += [note] if note not in notes else []
                    continue
                # Forms holding [N, V] tensors scale linearly with N: skip what would not fit.
                need = per_token.get((weights, form), 0) * tokens if form != "fused" else 0
                free = available_memory(args.device)
                if need > 0.8 * free:
                    print(f"| {tokens} | {weights} | {form} | — | — | — | — | — | — |  skipped: needs ~{need / GiB:.0f} GiB,"
                          f" {free / GiB:.0f} GiB available")
                    continue
                r = run(form, tokens, weights, args)
                if "note" in r:
                    print(f"| {tokens} | {weights} | {form} | — | — | — | — | — | — | {r['note']}")
                    continue
                per_token.setdefault((weights, form), r["peak_extra"] / tokens)
                if form == "full":
                    baseline = r
                ratio = lambda key, digits=2: f"{r[key] / baseline[key]:.{digits}f}x" if baseline else "—"  # noqa: E731
                print(f"| {tokens} | {weights} | {form} | {r['cold']:.2f} | {r['warm']:.2f} | {ratio('cold')} |"
                      f" {ratio('warm')} | {r['peak_extra'] / GiB:.2f} | {ratio('peak_extra', 3)} |", flush=True)
    for note in notes:
        print(f"\nNote: {note}.")


if __name__ == "__main__":
    main()
