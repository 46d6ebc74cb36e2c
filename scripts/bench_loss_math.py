"""The fused loss's per-block math alone, eager against compiled (``compile_loss``): cross-entropy,
forward KL and the logit gradient of one chunk of logits, without the head GEMMs around it.

Logits of ``--rows`` tokens over a ``--vocab`` vocabulary are drawn once per teacher kind: ``flat``
(teacher logits of spread 3, as a random-weight model's) and ``sharp`` (spread 60: most of the
teacher's log-probabilities lie below -87, where float32 exp results are subnormal, as a trained
teacher's do). Each form processes the chunk the way `FusedLinearKDLoss` does (the eager form in
blocks of `block_rows`, the compiled one in blocks of `compiled_rows`), in a process of its own
(the best of 3 calls after a first, which for the compiled form compiles); the two forms' processes
alternate ``--repeats`` times and each form's median is shown, with the first call apart.

    python scripts/bench_loss_math.py [--vocab 151936] [--rows 256] [--dtype fp32] [--repeats 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from kdtune.losses.divergences import ForwardKLLoss
from kdtune.losses.fused import FusedLinearKDLoss, block_rows
from kdtune.losses.fused_block import compiled_rows


def chunk_pass(loss, rows_per_block, logits, teacher, targets, out):
    for first in range(0, logits.shape[0], rows_per_block):
        block = slice(first, first + rows_per_block)
        loss.block_sums_and_grad(logits[block], teacher[block], targets[block], None, 0.5, out=out[block])


def measure(form: str, kind: str, vocab: int, rows: int, dtype_name: str) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    teacher = (torch.randn(rows, vocab, generator=g) * SPREAD[kind]).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    out = torch.empty_like(logits)
    compiled = form == "compiled"
    loss = FusedLinearKDLoss(ForwardKLLoss(), compile=compiled)
    block = compiled_rows(vocab) if compiled else block_rows(vocab)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        chunk_pass(loss, block, logits, teacher, targets, out)
        times.append(time.perf_counter() - start)
    return {"first": times[0], "seconds": min(times[1:])}


SPREAD = {"flat": 3.0, "sharp": 60.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.vocab, args.rows, args.dtype)))
        return
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, {args.rows} rows x "
          f"{args.vocab} vocabulary; median of {args.repeats} alternated processes per form")
    print("| teacher | form | s per chunk | range | first call s | x eager |")
    print("|---|---|---:|---:|---:|---:|")
    common = ["--vocab", str(args.vocab), "--rows", str(args.rows), "--dtype", args.dtype]
    for kind in SPREAD:
        runs = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for form in runs:
                out = subprocess.run([sys.executable, __file__, "--child", form, kind, *common], check=True,
                                     capture_output=True, text=True).stdout
                runs[form].append(json.loads(out.strip().splitlines()[-1]))
        eager = statistics.median(r["seconds"] for r in runs["eager"])
        for form, results in runs.items():
            seconds = [r["seconds"] for r in results]
            median = statistics.median(seconds)
            first = statistics.median(r["first"] for r in results)
            print(f"| {kind} | {form} | {median:.3f} | {min(seconds):.3f}-{max(seconds):.3f} | {first:.2f} | "
                  f"{eager / median:.2f} |")


if __name__ == "__main__":
    main()
