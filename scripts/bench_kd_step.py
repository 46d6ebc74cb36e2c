"""Distillation step throughput and peak memory: fused vs chunked vs full-logits loss forms, and
fused from a cached teacher's top-64 log-probabilities (``cached``), each against the machine's GEMM
rate measured in the same run.

Shapes (``--shape``): ``small``, a 4x512 teacher and a 2x256 student; ``qwen0.5b``, 2-layer slices of
Qwen2-1.5B (teacher) and Qwen2-0.5B (student); ``qwen1.5b_to_0.5b``, the two whole (28 and 24 layers,
for a GPU). Both with the real Qwen2 vocabulary (151,936), random
weights; one optimizer step = student forward + teacher forward + loss + backward + AdamW on every
student weight. ``cached`` never builds the teacher: each step reads the batch's rows from a cache
shard (q8 storage, memory-mapped) and collates them as training does. Each form runs
in its own process so peak memory is its own; ratios are against the full-logits form of this run.

The share of the GEMM rate is the time the step's matmul FLOPs (linear layers, causal attention,
output heads; the student's three times for forward and backward) would take at the rate torch.mm
reaches at each model's output-head shape over the step's time (the fastest of ``--steps``). The
rate is the kernel's: the best of 2 s of calls into an output made once, timed by each run's own
process right after its steps, so a slow spell of the machine slows both. ``--dtype fp32,bf16``
alternates the two dtypes in one invocation; ``--adamw`` picks the optimizer's implementation (fused
by default, as the model configs set it); ``--thp`` sets PyTorch's ``THP_MEM_ALLOC_ENABLE`` in the
runs (1 by default, as ``kdtune run`` does; ``1,0`` alternates the two).
``fused_compiled`` is ``fused`` with its per-block math compiled (``compile_loss: true``). ``--repeats N`` runs every form N times,
alternated, and shows each form's median run with the range; the first step (allocation, and the
loss's compile where it compiles) is shown apart. ``--seq`` sets the sequence length, ``--softcap``
caps both models' logits as Gemma 2 does.
``--breakdown`` adds where the fused step's time goes (torch.profiler). ``--device cuda`` runs on a
GPU (times after a synchronize, peak memory as allocated by torch); ``chunked`` is the loss as
torchtune computes it (logits of one sequence chunk at a time, through autograd), the baseline a GPU
user compares with.

    python scripts/bench_kd_step.py [--shape small] [--tokens 1024] [--seq 512] [--steps 3] [--dtype fp32[,bf16]] [--adamw fused] [--thp 1[,0]]
        [--forms full,chunked,fused,fused_compiled,cached] [--repeats 1] [--softcap CAP] [--device cpu] [--breakdown]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VOCAB = 151_936


SEQ = 512
# torch.optim.AdamW's implementations: one fused kernel (the model configs' `fused: true`), a foreach
# pass per operation over all tensors, or a loop over tensors (torch's default on CPU).
ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
# (hidden, intermediate, layers, heads, kv heads) of the (teacher, student) of each shape.
SHAPES = {"tiny": ((64, 128, 1, 4, 2), (32, 64, 1, 4, 2)),  # scripts/gpu_check.sh --dry-run
          "small": ((512, 2048, 4, 8, 4), (256, 1024, 2, 4, 2)),
          "qwen0.5b": ((1536, 8960, 2, 12, 2), (896, 4864, 2, 14, 2)),
          "qwen1.5b_to_0.5b": ((1536, 8960, 28, 12, 2), (896, 4864, 24, 14, 2))}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _args(hidden, intermediate, layers, heads, kv_heads, softcap=None):
    from kdtune.models.args import ModelArgs

    return ModelArgs(model_type="qwen2", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                     norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, qkv_bias=True,
                     final_logit_softcapping=softcap)


def forward_flops(args, tokens: int, seq: int = 512) -> float:
    """Matmul FLOPs of one forward over ``tokens`` (sequences of ``seq``): linear layers, causal
    attention (half the scores), the output head."""
    kv = args.num_kv_heads * args.head_dim
    linear = args.hidden_size * (2 * args.hidden_size + 2 * kv) + 3 * args.hidden_size * args.intermediate_size
    attention = 2 * seq * args.hidden_size  # QK^T and AV, causal: S/2 keys per query, 2 FLOPs a multiply-add
    return 2 * tokens * (args.num_layers * linear + args.vocab_size * args.hidden_size) + tokens * args.num_layers * attention


def gemm_rate(dtype_name: str, d: int, device: str = "cpu", seconds: float = 2.0) -> float:
    """FLOP/s of torch.mm at an output head's shape: [256, d] x [d, V], into an output allocated once
    (a new output each call adds its page faults: a third lower at the small heads in bf16 on the
    development VM)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(256, d, dtype=dtype, device=device), torch.randn(d, VOCAB, dtype=dtype, device=device)
    out = torch.mm(a, b)
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        call = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - call)
    return 2 * 256 * d * VOCAB / best


def _cached_batches(batch: dict, folder: str, k: int = 64):
    """A cache shard (the default q8 storage) holding top-k rows for the batch's trained positions,
    and a function that reads and collates them per step the way distillation from a cache does."""
    from pathlib import Path

    import torch

    from kdtune.offline import collate_with_teacher_topk
    from kdtune.offline.shards import ShardReader, encode_rows, write_shard

    counts = (batch["labels"] != -100).sum(1).tolist()
    rows = sum(counts)
    # Distinct ids per row without a [rows, vocab] temporary; decreasing log-probabilities.
    ids = (torch.arange(rows)[:, None] * 7919 + torch.arange(k) * 2371) % VOCAB
    logprobs = torch.randn(rows, k + 1).log_softmax(-1)[:, :k].sort(-1, descending=True).values
    write_shard(Path(folder) / "shard.safetensors", encode_rows(logprobs, ids, "q8", VOCAB))
    reader = ShardReader(Path(folder), storage="q8", top_k=k, vocab_size=VOCAB)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    samples = [{"tokens": t.tolist(), "labels": y.tolist()} for t, y in zip(batch["tokens"], batch["labels"])]

    def read():
        for s, offset, count in zip(samples, offsets, counts):
            s["teacher_logprobs"], s["teacher_ids"] = reader.rows("shard.safetensors", offset, count)
        return collate_with_teacher_topk(samples, pad_id=0)

    return read


def measure(form: str, tokens: int, steps: int, dtype_name: str, shape: str, breakdown: bool = False,
            device: str = "cpu", seq: int = 512, softcap: float | None = None, adamw: str = "fused") -> dict:
    import torch

    from kdtune.losses import ForwardKLLoss, LinearKDLoss
    from kdtune.models import TransformerDecoder
    from kdtune.training import to_device

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    teacher_args, student_args = (_args(*dims, softcap=softcap) for dims in SHAPES[shape])
    student = TransformerDecoder(student_args).to(device=device, dtype=dtype)
    cached = form == "cached"
    teacher = None if cached else TransformerDecoder(teacher_args).to(device=device, dtype=dtype).requires_grad_(False).eval()
    batch = {"tokens": torch.randint(0, VOCAB, (tokens // seq, seq))}
    batch["labels"] = torch.roll(batch["tokens"], -1, dims=1)
    batch["labels"][:, -1] = -100
    on_device = {k: v.to(device) for k, v in batch.items()}
    caps = dict(student_softcap=softcap, teacher_softcap=softcap)
    kd_loss = LinearKDLoss(ForwardKLLoss(), form="fused" if cached or form == "fused_compiled" else form, chunk_size=256,
                           compile=form == "fused_compiled", **caps)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, **ADAMW[adamw])
    n = int((batch["labels"] != -100).sum())
    folder = tempfile.TemporaryDirectory()  # removed when the measurement ends
    read = _cached_batches(batch, folder.name) if cached else None
    next_batch = (lambda: to_device(read(), torch.device(device))) if cached else (lambda: on_device)
    sections = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        sections[name] = sections.get(name, 0.0) + time.perf_counter() - start
        return out

    def step():  # the KD recipe's step, one micro-batch
        b = timed("data", next_batch)
        hidden = timed("student forward", lambda: student(b["tokens"], return_hidden=True))
        if teacher is None:
            teacher_out, teacher_weight = b["teacher_topk"], None
        else:
            with torch.no_grad():
                teacher_out = timed("teacher forward", lambda: teacher(b["tokens"], return_hidden=True))
            teacher_weight = teacher.output_weight
        ce, kd = timed("loss (fused: heads, grads)", lambda: kd_loss(
            hidden, student.output_weight, teacher_out, teacher_weight, b["labels"], kd_ratio=0.5, num_tokens=n))
        timed("backward", lambda: (0.5 * ce + 0.5 * kd).backward())
        timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))

    def peak_bytes() -> int:
        if device.startswith("cuda"):
            return torch.cuda.max_memory_allocated(device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    start = time.perf_counter()
    step()  # warm-up: allocates the optimizer state and gradients, which every form needs alike, and compiles
    first = time.perf_counter() - start
    sections.clear()
    base = peak_bytes()
    times, per_step = [], []
    for _ in range(steps):
        sections.clear()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        per_step.append(dict(sections))
    best = min(range(steps), key=times.__getitem__)  # the fastest step, as timeit reports: this shared
    seconds = times[best]  # machine's speed varies from run to run
    peak = peak_bytes()
    student_flops = 3 * forward_flops(student_args, tokens, seq)
    teacher_flops = 0 if cached else forward_flops(teacher_args, tokens, seq)
    result = {"form": form, "tokens_per_second": tokens / seconds, "seconds_per_step": seconds,
              "first_step_seconds": first,
              "flops_per_second": (student_flops + teacher_flops) / seconds,
              "student_flops": student_flops, "teacher_flops": teacher_flops, "peak_rss_gib": peak / 2**30,
              "extra_gib": max(peak - base, 0) / 2**30, "device": device,
              "sections": per_step[best]}
    if breakdown:
        result["kernels"] = _kernels(step)
    return result


def _kernels(step) -> dict:
    """Seconds per step by kind of kernel (torch.profiler over one step): matmuls, element-wise and
    reductions over the [chunk, vocab] logits and elsewhere, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    kinds = {}
    for event in prof.key_averages():
        name = event.key
        if name.startswith(("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
                            "aten::_scaled_dot_product")):
            kind = "matmuls (heads, layers, attention)"
        elif name.startswith("aten::"):
            kind = "element-wise and reductions"
        else:
            continue
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return kinds


def gemm_rates(dtype_name: str, shape: str, device: str, seconds: float) -> dict:
    """The GEMM rate at the student's and at the teacher's head shape."""
    teacher, student = SHAPES[shape]
    return {"student": gemm_rate(dtype_name, student[0], device, seconds),
            "teacher": gemm_rate(dtype_name, teacher[0], device, seconds)}


def _share(result: dict, rates: dict) -> float:
    """The time the step's matmuls would take at the measured GEMM rates (each model's at its own
    head shape) over the step's time: 100% is a step as fast as its matmuls alone."""
    ideal = result["student_flops"] / rates["student"] + result["teacher_flops"] / rates["teacher"]
    return ideal / result["seconds_per_step"]


def main() -> None:
    global VOCAB
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (a multiple of --seq)")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence")
    parser.add_argument("--softcap", type=float, default=None, help="both models' final-logit cap (Gemma 2's 30)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every form and dtype, alternated; medians are shown, with the range")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, or both as fp32,bf16 (alternated)")
    parser.add_argument("--forms", default="full,chunked,fused,cached")
    parser.add_argument("--adamw", default="fused", choices=list(ADAMW), help="the optimizer's implementation")
    parser.add_argument("--thp", default="1", help="THP_MEM_ALLOC_ENABLE of the runs: 1 (as `kdtune run` sets it), 0, "
                                                   "or 1,0 (alternated)")
    parser.add_argument("--breakdown", action="store_true", help="where the fused step's time goes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="both models' vocabulary (default: Qwen2's)")
    parser.add_argument("--json", help="also write the rows and GEMM rates to this file")
    parser.add_argument("--gemm-seconds", type=float, default=2.0, help="how long each GEMM rate is timed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    VOCAB = args.vocab
    thps = args.thp.split(",")
    if any(t not in ("0", "1") for t in thps):
        parser.error(f"--thp: expected 1, 0 or 1,0, got {args.thp!r}")
    dtypes = args.dtype.split(",")
    if any(d not in ("fp32", "bf16") for d in dtypes):
        parser.error(f"--dtype: expected fp32, bf16 or fp32,bf16, got {args.dtype!r}")
    if args.gemm:
        print(json.dumps(gemm_rates(dtypes[0], args.shape, args.device, args.gemm_seconds)))
        return
    if args.child:
        result = measure(args.child, args.tokens, args.steps, dtypes[0], args.shape,
                         args.breakdown and args.child.startswith("fused"), args.device, args.seq, args.softcap,
                         args.adamw)
        # The GEMM rate in the same process, right after its steps: a slow spell of the VM slows both alike.
        result["gemm_rates"] = gemm_rates(dtypes[0], args.shape, args.device, args.gemm_seconds)
        result["gemm_share"] = _share(result, result["gemm_rates"])
        print(json.dumps(result))
        return
    common = ["--tokens", str(args.tokens), "--steps", str(args.steps), "--shape", args.shape,
              "--device", args.device, "--vocab", str(args.vocab), "--gemm-seconds", str(args.gemm_seconds),
              "--seq", str(args.seq), "--adamw", args.adamw, *(["--softcap", str(args.softcap)] if args.softcap else [])]
    forms = args.forms.split(",")
    runs = {(thp, dtype, form): [] for thp in thps for dtype in dtypes for form in forms}
    for _ in range(args.repeats):  # settings and forms in turn, so that the VM's swings reach each alike
        for thp, dtype, form in runs:
            # torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: one setting per process
            out = subprocess.run([sys.executable, __file__, "--child", form, "--dtype", dtype, *common,
                                  *(["--breakdown"] if args.breakdown else [])],
                                 check=True, capture_output=True, text=True,
                                 env=dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)).stdout
            runs[thp, dtype, form].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for (thp, dtype, form), done in runs.items():  # the median run by step time, with medians of the rest
        ordered = sorted(done, key=lambda r: r["seconds_per_step"])
        row = dict(ordered[(len(ordered) - 1) // 2], dtype=dtype, thp=thp, runs=len(ordered))
        row["range_tokens_per_second"] = (ordered[-1]["tokens_per_second"], ordered[0]["tokens_per_second"])
        shares = [r["gemm_share"] for r in done]
        row["gemm_share"], row["range_gemm_share"] = statistics.median_low(shares), (min(shares), max(shares))
        row["gemm_rates"] = {m: statistics.median_low([r["gemm_rates"][m] for r in done]) for m in ("student", "teacher")}
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "runs": {f"thp{t} {d} {f}": r for (t, d, f), r in runs.items()}, "shape": args.shape,
                       "dtypes": dtypes, "device": args.device, "tokens": args.tokens, "seq": args.seq,
                       "softcap": args.softcap, "vocab": VOCAB, "adamw": args.adamw, "thp": thps}, f, indent=2)
    teacher, student = SHAPES[args.shape]
    machine = platform.processor() or platform.machine()
    if args.device.startswith("cuda"):
        import torch

        machine = torch.cuda.get_device_name(args.device)
    print(f"machine: {machine}, {args.tokens} tokens/step in sequences of {args.seq}, "
          f"{'softcap ' + str(args.softcap) + ', ' if args.softcap else ''}"
          f"teacher {teacher[2]}x{teacher[0]}, student {student[2]}x{student[0]}, vocab {VOCAB}, {args.adamw} AdamW; "
          f"each run's GEMM share against the GEMM rate its own process measured after its steps")
    for thp, dtype in ((t, d) for t in thps for d in dtypes):
        group = [r for r in rows if r["dtype"] == dtype and r["thp"] == thp]
        base = next((r for r in group if r["form"] == "full"), group[0])
        speed, memory = f"x {base['form']} (tok/s)", f"x {base['form']} (peak)"
        print(f"\n{dtype}, THP_MEM_ALLOC_ENABLE={thp}")
        print(f"{'form':<14} {'tokens/s':>9} {'range':>11} {'s/step':>7} {'1st step s':>10} {'GEMM GFLOP/s':>13} "
              f"{'GEMM share':>11} {'share range':>12} {'peak GiB':>9} {speed:>20} {memory:>18}")
        for r in group:
            low, high = r["range_tokens_per_second"]
            share_low, share_high = r["range_gemm_share"]
            rates = f"{r['gemm_rates']['student'] / 1e9:.0f}/{r['gemm_rates']['teacher'] / 1e9:.0f}"
            print(f"{r['form']:<14} {r['tokens_per_second']:>9.0f} {f'{low:.0f}-{high:.0f}':>11} "
                  f"{r['seconds_per_step']:>7.2f} {r['first_step_seconds']:>10.2f} {rates:>13} "
                  f"{r['gemm_share']:>10.0%} {f'{share_low:.0%}-{share_high:.0%}':>12} {r['peak_rss_gib']:>9.2f} "
                  f"{r['tokens_per_second'] / base['tokens_per_second']:>20.2f} "
                  f"{r['peak_rss_gib'] / base['peak_rss_gib']:>18.2f}")
    print("GEMM GFLOP/s: torch.mm at the student's/teacher's head shape (medians of the runs)")
    if args.repeats > 1:
        print(f"median of {args.repeats} alternated runs per form and dtype, each run's fastest of {args.steps} "
              f"steps after a first step (its allocation, and where the loss compiles, the compile: '1st step s')")
    for fused in (r for r in rows if args.breakdown and "kernels" in r):
        total, form = fused["seconds_per_step"], f"{fused['dtype']} {fused['form']} (THP_MEM_ALLOC_ENABLE={fused['thp']})"
        print(f"\n{form} step, {total:.2f} s: by stage")
        for name, seconds in fused["sections"].items():
            print(f"  {name:<34} {seconds:>7.3f} s {seconds / total:>6.1%}")
        print(f"{form} step: by kind of kernel (torch.profiler, self time)")
        for name, seconds in sorted(fused["kernels"].items(), key=lambda item: -item[1]):
            print(f"  {name:<34} {seconds:>7.3f} s {seconds / total:>6.1%}")


if __name__ == "__main__":
    main()
