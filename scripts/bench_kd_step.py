"""Distillation step throughput and peak memory: fused vs chunked vs full-logits loss forms, and
fused from a cached teacher's top-64 log-probabilities (``cached``).

A 4-layer teacher and a 2-layer student with the real Qwen2 vocabulary (151,936), random weights,
one optimizer step = student forward + teacher forward + loss + backward + AdamW. ``cached`` never
builds the teacher: each step reads the batch's rows from a cache shard (float16 values, 3-byte ids,
memory-mapped) and collates them as training does. Each form runs in its own process so peak memory
is its own; ratios are against the full-logits form of this run.

    python scripts/bench_kd_step.py [--tokens 1024] [--steps 3] [--dtype fp32] [--forms full,chunked,fused,cached]
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

VOCAB = 151_936


def _args(hidden, layers, heads):
    from kdtune.models.args import ModelArgs

    return ModelArgs(model_type="qwen2", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                     num_layers=layers, num_heads=heads, num_kv_heads=heads // 2, head_dim=hidden // heads,
                     norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, qkv_bias=True)


def _cached_batches(batch: dict, folder: str, k: int = 64):
    """A cache shard holding top-k rows for the batch's trained positions, and a function that reads
    and collates them per step the way distillation from a cache does."""
    from pathlib import Path

    import torch

    from kdtune.offline import collate_with_teacher_topk, encode_ids, id_bytes
    from kdtune.offline.shards import ShardReader, write_shard

    counts = (batch["labels"] != -100).sum(1).tolist()
    rows = sum(counts)
    # Distinct ids per row without a [rows, vocab] temporary; decreasing log-probabilities.
    ids = (torch.arange(rows)[:, None] * 7919 + torch.arange(k) * 2371) % VOCAB
    logprobs = torch.randn(rows, k + 1).log_softmax(-1)[:, :k].sort(-1, descending=True).values
    write_shard(Path(folder) / "shard.safetensors", logprobs.half(), encode_ids(ids, id_bytes(VOCAB)))
    reader, offsets = ShardReader(Path(folder)), [sum(counts[:i]) for i in range(len(counts))]
    samples = [{"tokens": t.tolist(), "labels": y.tolist()} for t, y in zip(batch["tokens"], batch["labels"])]

    def read():
        for s, offset, count in zip(samples, offsets, counts):
            s["teacher_logprobs"], s["teacher_ids"] = reader.rows("shard.safetensors", offset, count)
        return collate_with_teacher_topk(samples, pad_id=0)

    return read


def measure(form: str, tokens: int, steps: int, dtype_name: str) -> dict:
    import torch

    from kdtune.losses import ForwardKLLoss, LinearKDLoss
    from kdtune.models import TransformerDecoder

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    student = TransformerDecoder(_args(256, 2, 4)).to(dtype)
    cached = form == "cached"
    teacher = None if cached else TransformerDecoder(_args(512, 4, 8)).to(dtype).requires_grad_(False).eval()
    seq = 512
    batch = {"tokens": torch.randint(0, VOCAB, (tokens // seq, seq))}
    batch["labels"] = torch.roll(batch["tokens"], -1, dims=1)
    batch["labels"][:, -1] = -100
    kd_loss = LinearKDLoss(ForwardKLLoss(), form="fused" if cached else form, chunk_size=256)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    n = int((batch["labels"] != -100).sum())
    folder = tempfile.TemporaryDirectory()  # removed when the measurement ends
    next_batch = _cached_batches(batch, folder.name) if cached else lambda: batch

    def step():  # the KD recipe's step, one micro-batch
        b = next_batch()
        hidden = student(b["tokens"], return_hidden=True)
        if teacher is None:
            teacher_out, teacher_weight = b["teacher_topk"], None
        else:
            with torch.no_grad():
                teacher_out, teacher_weight = teacher(b["tokens"], return_hidden=True), teacher.output_weight
        ce, kd = kd_loss(hidden, student.output_weight, teacher_out, teacher_weight, b["labels"], kd_ratio=0.5,
                         num_tokens=n)
        (0.5 * ce + 0.5 * kd).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer state and gradients, which every form needs alike
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"form": form, "tokens_per_second": tokens / seconds, "seconds_per_step": seconds,
            "peak_rss_gib": peak / 2**20, "extra_gib": max(peak - base, 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (multiple of 512)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--forms", default="full,chunked,fused,cached")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.steps, args.dtype)))
        return
    rows = []
    for form in args.forms.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", form, "--tokens", str(args.tokens),
                              "--steps", str(args.steps), "--dtype", args.dtype],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = next((r for r in rows if r["form"] == "full"), rows[0])
    print(f"machine: {platform.processor() or platform.machine()}, {resource.getpagesize()}-byte pages, "
          f"{args.tokens} tokens/step, {args.dtype}, teacher 4x512, student 2x256, vocab {VOCAB}")
    print(f"{'form':<8} {'tokens/s':>9} {'s/step':>7} {'peak RSS GiB':>13} {'x full (tok/s)':>15} {'x full (peak)':>14}")
    for r in rows:
        print(f"{r['form']:<8} {r['tokens_per_second']:>9.0f} {r['seconds_per_step']:>7.2f} {r['peak_rss_gib']:>13.2f} "
              f"{r['tokens_per_second'] / base['tokens_per_second']:>15.2f} {r['peak_rss_gib'] / base['peak_rss_gib']:>14.2f}")


if __name__ == "__main__":
    main()
