"""A minimal recipe for testing `kdtune run`: writes the config it received, its
THP_MEM_ALLOC_ENABLE (and, under torchrun, the all-reduced sum of ranks) to
``${output_dir}/rank{RANK}.json``."""

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

import kdtune.config
from kdtune.errors import KDTuneError


@kdtune.config.parse
def main(cfg):
    if cfg.get("fail_with"):
        raise KDTuneError(cfg.fail_with)
    out = {"config": OmegaConf.to_container(cfg, resolve=True), "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    rank = int(os.environ.get("RANK", 0))
    if "WORLD_SIZE" in os.environ:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        out["world_size"] = dist.get_world_size()
        out["rank_sum"] = t.item()
        dist.destroy_process_group()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
