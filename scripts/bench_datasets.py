"""Loading and tokenizing 50,000 Alpaca-style rows with the Qwen2.5 tokenizer: time, throughput, memory.

The baseline is the obvious per-row loop measured in the same run (`tokenize_messages` on each
row, lists kept), against `alpaca_dataset` (chat renders per row, parallel batch encodes, flat
arrays), and against the floor: rendering each row once and encoding them all, without finding
the trained tokens. Each run is in a fresh process, so its peak RSS is its own ("RSS added": the
peak minus the RSS once the tokenizer is loaded); the fastest of ``--repeats`` runs is shown.
CPU seconds (all threads) say more than wall time on a machine other work shares.
Run: python scripts/bench_datasets.py [--rows N] [--repeats R] [--tokenizer DIR]
"""

import argparse
import json
import multiprocessing
from pathlib import Path
import random
import resource
import tempfile
import time

from kdtune.datasets import alpaca_dataset
from kdtune.datasets.messages import alpaca_messages
from kdtune.datasets.rows import load_rows
from kdtune.tokenization import load_tokenizer

WORDS = "the a model learns to answer questions about data code numbers history science with care and detail".split()


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"instruction": text(5, 30), "input": text(0, 20) if rng.random() < 0.4 else "", "output": text(20, 150)}
            for _ in range(n)]


def per_row(tokenizer, path: str) -> tuple[int, int]:
    samples = [tokenizer.tokenize_messages(alpaca_messages(r.data), train_on="last") for r in load_rows("jsonl", path)]
    return len(samples), sum(len(ids) for ids, _ in samples)


def floor(tokenizer, path: str) -> tuple[int, int]:
    """One render per row and one parallel encode, no mask: the least any chat dataset can cost."""
    texts = [tokenizer.render_chat(alpaca_messages(r.data)) for r in load_rows("jsonl", path)]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return len(encoded), sum(map(len, encoded))


def batched(tokenizer, path: str) -> tuple[int, int]:
    data = alpaca_dataset(tokenizer, source="jsonl", data_files=path)
    return len(data), data.num_tokens


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(method, tokenizer_dir: str, path: str) -> tuple[float, float, int, int, float, float]:
    """In a child process: wall and CPU seconds (all threads), rows, tokens, peak RSS and RSS added (MiB)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    loaded = peak_rss_mib()
    start, cpu = time.perf_counter(), cpu_seconds()
    rows, tokens = method(tokenizer, path)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return seconds, cpu, rows, tokens, peak_rss_mib(), peak_rss_mib() - loaded


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(Path(__file__).parents[1] / "tests/assets/qwen2_5_tokenizer"))
    args = parser.parse_args()

    methods = {
        "per-row tokenize_messages (baseline)": per_row,
        "alpaca_dataset (batched)": batched,
        "render + encode_batch, no mask (floor)": floor,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        path = str(Path(tmp) / "alpaca.jsonl")
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(args.rows)))
        for name, method in methods.items():
            runs = [pool.apply(measure, (method, args.tokenizer, path)) for _ in range(args.repeats)]
            results[name] = min(runs)

    base = results["per-row tokenize_messages (baseline)"][0]
    print(f"{args.rows} Alpaca-style rows, tokenizer {args.tokenizer}, best of {args.repeats}")
    print(
        f"{'method':38} {'seconds':>8} {'CPU s':>6} {'rows/s':>7} {'tokens/s':>9} {'peak RSS MiB':>12} "
        f"{'RSS added':>9} {'speedup':>7}"
    )
    for name, (seconds, cpu, rows, tokens, peak, added) in results.items():
        print(
            f"{name:38} {seconds:8.2f} {cpu:6.1f} {rows / seconds:7.0f} {tokens / seconds:9.0f} {peak:12.0f} "
            f"{added:9.0f} {base / seconds:6.2f}x"
        )
    print(f"{tokens} tokens, {tokens / rows:.0f} per row")

if __name__ == "__main__":
    main()
