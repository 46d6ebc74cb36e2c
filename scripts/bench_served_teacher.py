"""A vLLM-served teacher against the same teacher run by kdtune, in one run on one machine: the top-k
rows a cache is written from (tokens/s), and a KD step's time with the teacher local, served with
the next step's rows fetched meanwhile (lookahead), served without it, and with the rows already in
memory (the student's own step), from which follows how much of the request time the lookahead hides.

Needs a running server of the teacher (make serve-teacher MODEL=... NAME=...):

    python scripts/bench_served_teacher.py --teacher /tmp/kdtune/SmolLM2-135M-Instruct \\
        --student /tmp/kdtune/SmolLM2-135M-pruned --data /tmp/kdtune/smollm2_answers/generations.jsonl \\
        --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct [--device cuda]
"""

import argparse
import statistics
import time

import torch

import kdtune
from kdtune.datasets import chat_dataset, collate
from kdtune.losses import ForwardKLLoss, LinearKDLoss
from kdtune.offline.dataset import collate_with_teacher_topk
from kdtune.offline.writer import teacher_topk
from kdtune.serving import ServedTeacher, ServedTeacherDataset
from kdtune.training import StepBatches, TrainingState


def cache_rows(args, teacher, served, samples) -> dict:
    """Seconds to compute the top-k rows of ``samples``, natively (batches of 8) and served."""
    tokens = sum(len(s["tokens"]) for s in samples)
    times = {"native": [], "served": []}
    for _ in range(args.repeats):  # alternated, so that the VM's swings hit both
        start = time.perf_counter()
        for i in range(0, len(samples), 8):
            batch = {k: v.to(args.device) for k, v in collate(samples[i:i + 8], 0).items()}
            teacher_topk(teacher, batch, teacher.output_weight, args.top_k, 1.0)
        times["native"].append(time.perf_counter() - start)
        start = time.perf_counter()
        served.sample_rows(samples)
        times["served"].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def kd_steps(args, student, teacher, dataset, mode: str, pad_id: int) -> float:
    """Median seconds of a KD step (forward, fused loss, backward, AdamW) after the first."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    loss_fn = LinearKDLoss(ForwardKLLoss(vocab_size=student.args.vocab_size), form="fused")
    if mode == "local":
        data, collate_fn = dataset.dataset, lambda b: collate(b, pad_id)
    elif mode == "in memory":
        rows = [dataset[i] for i in range(len(dataset))]  # fetched before the clock starts
        data, collate_fn = rows, lambda b: collate_with_teacher_topk(b, pad_id)
    else:
        data, collate_fn = dataset, lambda b: collate_with_teacher_topk(b, pad_id)
    steps = StepBatches(data, batch_size=args.batch_size, collate_fn=collate_fn, seed=0, shuffle=False,
                        max_steps_per_epoch=args.steps + 1, lookahead=mode == "served, lookahead")
    times, start = [], time.perf_counter()
    for micro in steps.epoch(TrainingState()):
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in micro[0].items()}
        hidden = student(batch["tokens"], return_hidden=True)
        if mode == "local":
            with torch.no_grad():
                rows, weight = teacher(batch["tokens"], return_hidden=True), teacher.output_weight
        else:
            rows, weight = batch["teacher_topk"], None
            rows = type(rows)(rows.logprobs.to(args.device), rows.ids.to(args.device))
        ce, kd = loss_fn(hidden, student.output_weight, rows, weight, batch["labels"], kd_ratio=0.5,
                         num_tokens=int((batch["labels"] != -100).sum()))
        (0.5 * ce + 0.5 * kd).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the served model's checkpoint folder")
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True, help="a chat jsonl file")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True, help="the served model's name")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="samples the cache rows are computed for")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    tok = kdtune.load_tokenizer(args.teacher)
    teacher = kdtune.load_model(args.teacher, device=args.device)
    served = ServedTeacher(base_url=args.base_url, model=args.model, top_k=args.top_k, vocab_size=tok.vocab_size)
    served.check(tok)
    data = chat_dataset(tok, data_files=args.data, source="jsonl", max_seq_len=512)
    samples = [data[i] for i in range(min(args.samples, len(data)))]
    rate = cache_rows(args, teacher, served, samples)
    print(f"top-{args.top_k} rows of {len(samples)} samples ({sum(len(s['tokens']) for s in samples)} tokens), "
          f"median of {args.repeats}, alternated:")
    print("| teacher | tokens/s | ratio |\n|---|---:|---:|")
    for name, value in rate.items():
        print(f"| {name} | {value:,.0f} | {value / rate['native']:.2f}x |")

    joined = ServedTeacherDataset(data, served)
    step = {}
    for mode in ("local", "served, lookahead", "served, no lookahead", "in memory"):
        student = kdtune.load_model(args.student, device=args.device).train()
        step[mode] = kd_steps(args, student, teacher, joined, mode, tok.pad_id)
    print(f"\nKD step, batch {args.batch_size}, median of {args.steps} steps after the first:")
    print("| teacher rows | seconds a step | ratio to local |\n|---|---:|---:|")
    for mode, seconds in step.items():
        print(f"| {mode} | {seconds:.3f} | {seconds / step['local']:.2f}x |")
    waiting = step["served, no lookahead"] - step["in memory"]
    if waiting > 0:
        hidden = (step["served, no lookahead"] - step["served, lookahead"]) / waiting
        print(f"\nrequests add {waiting:.3f} s to a step without lookahead; the lookahead hides {hidden:.0%} of it")


if __name__ == "__main__":
    main()
