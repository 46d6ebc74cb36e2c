"""Wall time and peak memory of pruning a checkpoint of real shape on the CPU, against a plain forward
pass over the same calibration tokens measured in the same run.

Writes a random bf16 checkpoint with Qwen2-1.5B's dimensions (1.54B parameters) to a temporary
folder, then runs each stage in a fresh subprocess (peak RSS is the process's high-water mark):

  forward        baseline: load the model and run it over the calibration batches, no hooks
  importance     load, and the importance pass (Block Influence, heads, MLP and hidden channels)
  prune + write  load, importance, plan (28 -> 22 layers, MLP 8960 -> 6144), cut and write the checkpoint

    python scripts/bench_prune.py [--samples 8] [--seq-len 128] [--dtype bf16] [--keep DIR]
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

QWEN2_1_5B = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
}
STAGES = ("forward", "importance", "prune + write")


def child(stage: str, folder: str, samples: int, seq_len: int, dtype_name: str) -> dict:
    import resource
    import time

    import torch

    from kdtune.checkpointing import HFCheckpointer, write_checkpoint
    from kdtune.pruning import calibration_batches, measure_importance, plan_pruning, prune_state_dict, pruned_config

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    rows = [{"tokens": torch.randint(0, 151000, (seq_len,), generator=g).tolist()} for _ in range(samples)]
    batches = calibration_batches(rows, num_samples=samples, batch_size=4, pad_id=0)
    start = time.perf_counter()
    checkpointer = HFCheckpointer(folder)
    model = checkpointer.load_model(dtype=dtype).eval()
    loaded = time.perf_counter()
    if stage == "forward":
        with torch.no_grad():
            for tokens, _ in batches:
                model(tokens)
    else:
        importance = measure_importance(model, batches, device=torch.device("cpu"), progress=False)
    measured = time.perf_counter()
    if stage == "prune + write":
        args = checkpointer.model_args
        plan = plan_pruning(importance, args, remove=6, intermediate_size=6144)
        with tempfile.TemporaryDirectory() as out:
            write_checkpoint(Path(out) / "pruned", pruned_config(checkpointer.config, args, plan),
                             prune_state_dict(model.state_dict(), args, plan), source_dir=Path(folder))
    end = time.perf_counter()
    return {"stage": stage, "seconds": end - start, "load_seconds": loaded - start,
            "pass_tokens_per_second": samples * seq_len / (measured - loaded),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--keep", help="write the random checkpoint here and keep it (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.samples, args.seq_len, args.dtype)))
        return

    import torch

    from kdtune.checkpointing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / "qwen2_1.5b_random"
        if not (folder / "config.json").is_file():
            write_random_checkpoint(QWEN2_1_5B, folder, dtype=torch.bfloat16, max_shard_size="2GB")
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
        rows = []
        for stage in STAGES:
            out = subprocess.run([sys.executable, __file__, "--child", stage, str(folder), "--samples",
                                  str(args.samples), "--seq-len", str(args.seq_len), "--dtype", args.dtype],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    tokens = args.samples * args.seq_len
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; Qwen2-1.5B shape (1.54B parameters, "
          f"{size:.2f} GiB bf16 on disk), {tokens} calibration tokens, {args.dtype}")
    print(f"{'stage':<14} {'wall s':>7} {'load s':>7} {'pass tok/s':>11} {'peak RSS GiB':>13} {'x forward time':>15} "
          f"{'x forward peak':>15}")
    for r in rows:
        print(f"{r['stage']:<14} {r['seconds']:>7.1f} {r['load_seconds']:>7.1f} {r['pass_tokens_per_second']:>11.0f} "
              f"{r['peak_rss_gib']:>13.2f} {r['seconds'] / base['seconds']:>15.2f} "
              f"{r['peak_rss_gib'] / base['peak_rss_gib']:>15.2f}")


if __name__ == "__main__":
    main()
