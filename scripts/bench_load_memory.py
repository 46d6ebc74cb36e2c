"""Peak memory of loading a 1.5B-parameter checkpoint, against the checkpoint's size.

Writes a random checkpoint with Qwen2-1.5B's dimensions (bf16, sharded) to a temporary folder,
then loads it in a fresh subprocess per method and reports the peak RSS growth (the kernel's
VmHWM, reset after imports; memory-mapped file pages count too). Every method touches every weight
after loading, so lazily mapped pages are paid for as a forward pass would.

Methods:
  kdtune bf16   ``kdtune.load_model(dtype=bfloat16)``: weights stay views of the mapped files
  kdtune fp32   ``kdtune.load_model(dtype=float32)``: converted tensor by tensor (2x the bytes)
  read+parse    baseline: read each file into memory, then ``safetensors.torch.load`` it

    python scripts/bench_load_memory.py [--shard-size 2GB] [--keep DIR]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kdtune.checkpointing import write_random_checkpoint

QWEN2_1_5B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}

LOADERS = {
    "kdtune bf16": "model = kdtune.load_model(CKPT, dtype=torch.bfloat16); tensors = list(model.parameters())",
    "kdtune fp32": "model = kdtune.load_model(CKPT, dtype=torch.float32); tensors = list(model.parameters())",
    "read+parse": (
        "from safetensors.torch import load\n"
        "tensors = [t for p in sorted(CKPT.glob('*.safetensors')) for t in load(p.read_bytes()).values()]"
    ),
}

CHILD = """
import sys, torch, kdtune
from pathlib import Path
import kdtune.checkpointing
CKPT = Path(sys.argv[1])
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
before = status('VmRSS:')
{loader}
touched = sum(float(t.float().sum()) for t in tensors)  # bring every page in
print(status('VmHWM:') - before, sum(t.numel() * t.element_size() for t in tensors))
"""


def measure(loader: str, checkpoint: Path) -> tuple[int, int]:
    code = CHILD.replace("{loader}", loader)
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, check=True)
    growth, tensor_bytes = map(int, out.stdout.split()[-2:])
    return growth, tensor_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.keep or Path(tmp) / "qwen2_1_5b_random"
        if not (checkpoint / "config.json").is_file():
            write_random_checkpoint(QWEN2_1_5B, checkpoint, dtype=torch.bfloat16, max_shard_size=args.shard_size)
        files = sorted(checkpoint.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        print(f"checkpoint: {len(files)} safetensors files, {size / 2**30:.2f} GiB (bf16, Qwen2-1.5B dims)\n")
        print(f"{'method':<14} {'weights GiB':>12} {'peak RSS growth GiB':>20} {'x checkpoint':>13} {'x weights':>10}")
        for name, loader in LOADERS.items():
            growth, tensor_bytes = measure(loader, checkpoint)
            print(
                f"{name:<14} {tensor_bytes / 2**30:>12.2f} {growth / 2**30:>20.2f} "
                f"{growth / size:>13.2f} {growth / tensor_bytes:>10.2f}"
            )


if __name__ == "__main__":
    main()
