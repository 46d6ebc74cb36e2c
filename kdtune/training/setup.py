"""The setup steps every recipe shares, in the order a recipe calls them: where the run writes and
whether it resumes, what a distillation checks before loading weights, batches, the optimizer and
schedule, the metric logger, and the loop."""

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from kdtune.checkpointing import HFCheckpointer, check_vocab_compatible, latest_checkpoint
from kdtune.config import instantiate, save_config
from kdtune.errors import KDTuneError
from kdtune.losses import Divergence
from kdtune.offline import teacher_cache_dir
from kdtune.training.data import build_dataloader
from kdtune.training.loop import Distribution, LoopSettings, StepPreparer, TrainLoop, steps_per_epoch
from kdtune.training.metric_logging import JsonlLogger
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed


class RunContext:
    """Device, dtype, seed, output folder and resume point, all settled before any weight loads."""

    def __init__(self, cfg: DictConfig, dist: Distribution | None = None):
        self.dist = dist or Distribution()
        self.device = self.dist.setup(resolve_device(cfg.get("device")))
        self.dtype = resolve_dtype(cfg.get("dtype", "fp32"))
        self.seed = set_seed(cfg.get("seed"))
        self.output_dir = Path(cfg.output_dir)
        self.resume_dir = _resume_dir(self.output_dir, bool(cfg.get("resume_from_checkpoint", False)))
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


@dataclass
class DistillationParts:
    tokenizer: object
    checkpointer: HFCheckpointer
    teacher_checkpointer: HFCheckpointer | None  # None when distilling from a teacher cache
    divergence: Divergence
    teacher_cache: str | None = None  # teacher_logits_cache: the cached top-k stand in for the teacher


def distillation_parts(cfg: DictConfig) -> DistillationParts:
    """``kd_ratio``, the tokenizer, both checkpoints (whose vocabularies must agree) and the divergence:
    what a distillation run can check before a weight is loaded. With a teacher cache there is no
    teacher checkpoint: the cache's tokenizer is checked by fingerprint when it is opened."""
    if not 0 <= cfg.kd_ratio <= 1:
        raise KDTuneError(f"kd_ratio: expected a value in [0, 1], got {cfg.kd_ratio}")
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    teacher_cache = teacher_cache_dir(cfg)
    teacher_checkpointer = None if teacher_cache else instantiate(cfg.teacher_checkpointer)
    vocab_size = check_vocab_compatible(checkpointer.checkpoint_dir,
                                        (teacher_checkpointer or checkpointer).checkpoint_dir, tokenizer.vocab_size)
    return DistillationParts(tokenizer, checkpointer, teacher_checkpointer,
                             instantiate(cfg.kd_loss, vocab_size=vocab_size), teacher_cache)


def build_batches(cfg: DictConfig, run: RunContext, dataset, collate_fn):
    """The dataloader, checked to hold at least one optimizer step before any weight is loaded."""
    if len(dataset) == 0:
        raise KDTuneError("dataset: no samples")
    loader = build_dataloader(dataset, batch_size=cfg.batch_size, shuffle=cfg.get("shuffle", True), seed=run.seed,
                              collate_fn=collate_fn, rank=run.dist.rank, world_size=run.dist.world_size)
    per_step = cfg.batch_size * cfg.get("gradient_accumulation_steps", 1) * run.dist.world_size
    if len(dataset) < per_step:
        raise KDTuneError(f"dataset: {len(dataset)} samples are fewer than one optimizer step needs ({per_step}: "
                          f"batch_size x gradient_accumulation_steps x processes)")
    return loader


def build_loop(cfg: DictConfig, run: RunContext, model, objective, batches, save,
               prepare_step: StepPreparer | None = None) -> TrainLoop:
    """Optimizer over the trainable parameters, schedule over the whole run, logger, and the loop —
    restored from the resume checkpoint when there is one."""
    settings = LoopSettings(
        epochs=cfg.epochs,
        gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        max_steps_per_epoch=cfg.get("max_steps_per_epoch"),
        clip_grad_norm=cfg.get("clip_grad_norm"),
        save_every_n_steps=cfg.get("save_every_n_steps"),
        log_every_n_steps=cfg.get("log_every_n_steps", 1),
    )
    optimizer = instantiate(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    logger = (instantiate(cfg.metric_logger) if cfg.get("metric_logger") else JsonlLogger(run.output_dir)) \
        if run.dist.is_main else None
    total_steps = settings.epochs * steps_per_epoch(batches, settings)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loop = TrainLoop(settings=settings, model=model, objective=objective, optimizer=optimizer,
                     lr_scheduler=lr_scheduler, dataloader=batches, device=run.device, logger=logger, save=save,
                     dist=run.dist, prepare_step=prepare_step)
    if cfg.get("compile", False):
        for layer in model.layers:
            layer.compile()
    if run.resume_dir is not None:
        loop.load_state_dict(run.dist.load_recipe_state(run.resume_dir))
    return loop
