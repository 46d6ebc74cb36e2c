"""Teacher-cache storage: bytes a token, the KD loss against exact top-k rows, and encode/decode speed
for each ``logprob_dtype`` (q8, fp16, fp32), all measured in the same run.

Teachers are synthetic rows over the real Qwen2 vocabulary (151,936): rank-frequency (Zipf) shapes
with noise, like a language model's, at three sharpnesses; students are either untrained (noise)
or near the teacher (its logits plus noise), where the loss is small and storage error shows most.
The loss is forward KL (and JSD, beta 0.5) over the k + 1 outcomes, as distillation from a cache
computes it. Bytes are the tensors a shard stores per token.

    python scripts/bench_cache.py [--k 64] [--rows 512]
"""

import argparse
import time

import torch

from kdtune.losses import ForwardKLLoss, GeneralizedJSDLoss, TeacherTopK
from kdtune.offline.shards import STORAGES, decode_rows, encode_rows

VOCAB = 151_936


def teacher(alpha: float, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    logits = -alpha * ranks.log() + 0.5 * torch.randn(rows, VOCAB, generator=g)
    return logits[:, torch.randperm(VOCAB, generator=g)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rows", type=int, default=512, help="tokens per teacher shape")
    args = parser.parse_args()
    losses = {"forward_kl": ForwardKLLoss(), "jsd": GeneralizedJSDLoss(beta=0.5)}
    worst = {s: {name: 0.0 for name in losses} for s in STORAGES}
    sizes, speed = {}, {s: [0.0, 0.0] for s in STORAGES}
    print(f"vocab {VOCAB}, k {args.k}, {args.rows} tokens per teacher; loss error = |cached - exact| / exact")
    print("| teacher | student | loss | exact top-k loss | " + " | ".join(f"{s} error" for s in STORAGES) + " |")
    print("|---|---|---|---:|" + "---:|" * len(STORAGES))
    for alpha in (1.0, 1.5, 2.0):
        logits = teacher(alpha, args.rows)
        top = logits.log_softmax(-1).topk(args.k, dim=-1)
        stored = {}
        for s in STORAGES:
            start = time.perf_counter()
            stored[s] = encode_rows(top.values, top.indices, s, VOCAB)
            speed[s][0] += time.perf_counter() - start
            sizes[s] = sum(t[0].numel() * t.element_size() for t in stored[s].values())
            start = time.perf_counter()
            stored[s] = decode_rows(stored[s], s, args.k, VOCAB)[0].float()
            speed[s][1] += time.perf_counter() - start
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        for student_name, student in (("untrained", noise), ("near (+0.3 noise)", logits + 0.3 * noise),
                                      ("nearer (+0.1 noise)", logits + 0.1 * noise)):
            for name, loss in losses.items():
                exact = float(loss.token_values(student, TeacherTopK(top.values, top.indices)).mean())
                errors = []
                for s in STORAGES:
                    value = float(loss.token_values(student, TeacherTopK(stored[s], top.indices)).mean())
                    errors.append(abs(value - exact) / exact)
                    worst[s][name] = max(worst[s][name], errors[-1])
                print(f"| zipf {alpha} | {student_name} | {name} | {exact:.4g} | "
                      + " | ".join(f"{e:.3%}" for e in errors) + " |")
    rows = 3 * args.rows
    print("\n| storage | bytes/token | vs fp16 | worst forward-KL error | worst JSD error | encode tokens/s | decode tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in STORAGES:
        print(f"| {s} | {sizes[s]} | {sizes[s] / sizes['fp16']:.2f}x | {worst[s]['forward_kl']:.3%} | "
              f"{worst[s]['jsd']:.3%} | {rows / speed[s][0]:,.0f} | {rows / speed[s][1]:,.0f} |")


if __name__ == "__main__":
    main()
