"""What distilling across tokenizers costs: the KD step with ``uld`` / ``hybrid_uld`` against
same-tokenizer KD (fused forward KL) on the same models, and the alignment in the data path.

Models: a 4x512 teacher and a 2x256 student (random weights). The student reads Mistral v0.3's
vocabulary (32,768, tests/assets); the teacher reads the same vocabulary (``same``: the fused forward
KL, and the cross-tokenizer losses on 1:1 spans, so only the loss differs) or Qwen2.5's (151,665:
the spans of two real tokenizers). Data: chats whose replies are ~250 tokens of instruction text,
batch 4. One step = student forward + teacher forward + loss + backward + AdamW. Each case runs in
its own process (peak memory is its own); the time is the median of ``--steps`` after one warm-up
step, with ratios against the fused same-tokenizer step of this run.

    python scripts/bench_cross_tokenizer.py [--steps 5] [--samples 1000] [--device cpu]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
TEACHER, STUDENT = (512, 2048, 4, 8, 4), (256, 1024, 2, 4, 2)
CASES = {"same tokenizer, forward_kl (fused)": ("mistral_v3_tokenizer", "forward_kl"),
         "same tokenizer, uld": ("mistral_v3_tokenizer", "uld"),
         "same tokenizer, hybrid_uld": ("mistral_v3_tokenizer", "hybrid_uld"),
         "Qwen2.5 teacher, uld": ("qwen2_5_tokenizer", "uld"),
         "Qwen2.5 teacher, hybrid_uld": ("qwen2_5_tokenizer", "hybrid_uld")}


def chats(path: Path, n: int) -> Path:
    from kdtune.datasets import instruction_prompts

    prompts = instruction_prompts(max(n, 64))
    rows = [{"messages": [{"role": "user", "content": prompts[i % len(prompts)]},
                          {"role": "assistant", "content": " ".join(prompts[(i + k) % len(prompts)] for k in range(12))}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model(shape, vocab):
    from kdtune.models.args import ModelArgs
    from kdtune.models.decoder import TransformerDecoder

    hidden, intermediate, layers, heads, kv = shape
    return TransformerDecoder(ModelArgs(model_type="qwen2", vocab_size=vocab, hidden_size=hidden,
                                        intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                                        num_kv_heads=kv, head_dim=hidden // heads, norm_eps=1e-6, rope_theta=1e6,
                                        tie_word_embeddings=True))


def one_case(name: str, steps: int, data: Path, device: str = "cpu") -> dict:
    import torch

    import kdtune
    from kdtune.datasets import chat_dataset, collate
    from kdtune.losses import AlignedTeacher, ForwardKLLoss, HybridULDLoss, LinearKDLoss, ULDLoss

    torch.manual_seed(0)
    teacher_vocab, loss_name = CASES[name]
    s_tok = kdtune.load_tokenizer(ASSETS / "mistral_v3_tokenizer")
    t_tok = kdtune.load_tokenizer(ASSETS / teacher_vocab)
    cross = loss_name != "forward_kl"
    dataset = chat_dataset(s_tok, source="jsonl", data_files=str(data), max_seq_len=512,
                           **({"teacher_tokenizer": t_tok} if cross else {}))
    student, teacher = model(STUDENT, s_tok.vocab_size).to(device), model(TEACHER, t_tok.vocab_size).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cross:
        loss = {"uld": ULDLoss, "hybrid_uld": HybridULDLoss}[loss_name]()
        loss.setup(s_tok, t_tok)
    else:
        loss = LinearKDLoss(ForwardKLLoss(vocab_size=s_tok.vocab_size), form="fused")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times, tokens = [], 0
    for step in range(steps + 1):
        batch = {k: v.to(device) for k, v in collate([dataset[(4 * step + i) % len(dataset)] for i in range(4)],
                                                     s_tok.pad_id).items()}
        sync(device)
        start = time.perf_counter()
        hidden = student(batch["tokens"], return_hidden=True)
        num_tokens = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            t_hidden = teacher(batch["teacher_tokens"] if cross else batch["tokens"], return_hidden=True)
        t_side = AlignedTeacher(t_hidden, batch["teacher_tokens"], batch["spans"]) if cross else t_hidden
        ce, kd = loss(hidden, student.output_weight, t_side, teacher.output_weight, batch["labels"], kd_ratio=0.5,
                      num_tokens=num_tokens)
        (0.5 * ce + 0.5 * kd).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - start)
            tokens += int(batch["tokens"].numel())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": statistics.median(times), "tokens_per_second": tokens / sum(times), "peak_gb": peak}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def alignment_cost(samples: int, data: Path) -> dict:
    import kdtune
    from kdtune.datasets import chat_dataset

    s_tok = kdtune.load_tokenizer(ASSETS / "mistral_v3_tokenizer")
    t_tok = kdtune.load_tokenizer(ASSETS / "qwen2_5_tokenizer")
    out = {}
    for label, extra in (("student only", {}), ("aligned with the teacher's", {"teacher_tokenizer": t_tok})):
        start = time.perf_counter()
        chat_dataset(s_tok, source="jsonl", data_files=str(data), max_seq_len=512, **extra)
        out[label] = (time.perf_counter() - start) * 1000 / samples
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case, args.steps, Path(args.data), args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = chats(Path(tmp) / "chats.jsonl", 64)
        results = {}
        for name in CASES:
            proc = subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(args.steps), "--data", str(data),
                                   "--device", args.device],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        align = alignment_cost(args.samples, chats(Path(tmp) / "many.jsonl", args.samples))
    base = results["same tokenizer, forward_kl (fused)"]
    print(f"{'step (student 2x256, teacher 4x512, batch 4)':<40} {'s/step':>8} {'tokens/s':>9} {'x time':>7} {'peak GB':>8} {'x mem':>6}")
    for name, r in results.items():
        print(f"{name:<40} {r['seconds']:>8.3f} {r['tokens_per_second']:>9.0f} {r['seconds'] / base['seconds']:>7.2f} "
              f"{r['peak_gb']:>8.2f} {r['peak_gb'] / base['peak_gb']:>6.2f}")
    print(f"\ndata path, ms per 1,000 chats ({args.samples} chats of ~280 tokens, Mistral v0.3 student, Qwen2.5 teacher):")
    for label, ms in align.items():
        print(f"  {label:<28} {ms * 1000:>8.0f}")


if __name__ == "__main__":
    main()
