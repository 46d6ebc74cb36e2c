"""Run under torchrun (2 processes): greedy generation from an FSDP2-sharded model with its weights
gathered (`FSDPDistribution.gathered`), each rank its own prompt, where rank 0's row stops at its
first token and rank 1's never does. With the weights gathered a forward needs no collective, so
rank 0 may stop early without leaving rank 1 waiting; each rank's completion equals the unsharded
model's, and afterwards the model is sharded again and trains.

Usage: torchrun --nproc_per_node 2 sharded_generation.py MODEL_DIR OUT_JSON
"""

import json
import sys

import torch
from torch.distributed.tensor import DTensor

import kdtune
from kdtune.generation import generate
from kdtune.training import distributed


def main(model_dir: str, out: str) -> None:
    run_dist = distributed.FSDPDistribution()
    run_dist.setup(torch.device("cpu"))
    tok = kdtune.load_tokenizer(model_dir)
    model = kdtune.load_model(model_dir)
    options = dict(max_new_tokens=8, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    prompts = [tok.encode(f"What is {a} + {b}?") for a, b in ((12, 30), (47, 38), (5, 71), (90, 9), (23, 23))]
    # unsharded, on every rank alike: the stop token is the first prompt's first greedy token, and
    # rank 1 takes a prompt whose greedy completion never contains it
    first = generate(model, prompts[:1], stop_ids=[], **options).completions[0]
    stop = first[0]
    other = next(p for p in prompts[1:] if stop not in generate(model, [p], stop_ids=[], **options).completions[0])
    mine = prompts[0] if run_dist.rank == 0 else other
    reference = generate(model, [mine], stop_ids=[stop], **options).completions[0]

    distributed.shard(model, run_dist, key="model")
    with run_dist.gathered(model):
        sharded = generate(model, [mine], stop_ids=[stop], **options).completions[0]
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    model(torch.tensor([mine])).sum().backward()  # and a training forward and backward work
    with open(f"{out}.{run_dist.rank}", "w") as f:
        json.dump({"reference": reference, "sharded": sharded, "resharded": resharded}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
