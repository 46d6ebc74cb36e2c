"""The run a recipe starts: device, dtype, seed, output folder and resume point, settled before any
weight loads."""

from pathlib import Path

from omegaconf import DictConfig

from kdtune.checkpointing import latest_checkpoint
from kdtune.config import save_config
from kdtune.errors import KDTuneError
from kdtune.training.distribution import Distribution
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed


class RunContext:
    """``device``, ``dtype``, ``seed``, ``output_dir`` and ``resume_dir`` (the checkpoint to resume
    from, or None) of this process, under the distribution strategy ``dist``."""

    def __init__(self, cfg: DictConfig, settings, dist: Distribution | None = None):
        self.dist = dist or Distribution()
        self.device = self.dist.setup(resolve_device(settings.device))
        self.dtype = resolve_dtype(settings.dtype)
        self.seed = set_seed(settings.seed)
        self.output_dir = Path(settings.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise KDTuneError(f"output_dir: '{self.output_dir}' is a file, not a folder")
        self.resume_dir = _resume_dir(self.output_dir, settings.resume_from_checkpoint)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")


def _resume_dir(output_dir: Path, resume: bool) -> Path | None:
    """The newest complete checkpoint to resume from; refuses to run over an earlier run's outputs."""
    if resume:
        found = latest_checkpoint(output_dir, with_recipe_state=True)
        if found is None:
            raise KDTuneError(f"resume_from_checkpoint: no complete checkpoint with recipe state in '{output_dir}'")
        return found
    if latest_checkpoint(output_dir) is not None or (output_dir / "metrics.jsonl").exists():
        raise KDTuneError(f"output_dir '{output_dir}' holds an earlier run; set resume_from_checkpoint=true "
                          f"to continue it or choose another output_dir")
    return None
