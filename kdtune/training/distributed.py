"""Data parallelism with FSDP2 under torchrun: every rank holds a shard of each model's weights,
gradients and optimizer state, and the loop sees the same global batch as a single-device run.

The process group uses NCCL on GPUs and gloo on CPUs. Each decoder layer and then the root
(embeddings, final norm, output projection) is a ``fully_shard`` unit; gradients are reduced in
float32. Checkpoints are written as on one device (HF weights gathered to rank 0, PEFT adapter), plus
the optimizer state as every rank's own shard (``torch.distributed.checkpoint``) in ``optimizer/``
beside them; several nodes need a shared filesystem for ``output_dir``.
"""

import atexit
import contextlib
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kdtune.checkpointing import HFCheckpointer, load_recipe_state
from kdtune.errors import KDTuneError
from kdtune.models import TransformerDecoder
from kdtune.modules.lora import LoRALinear, lora_modules
from kdtune.training.distribution import Distribution
from kdtune.training.models import student_saver
from kdtune.training.rng import get_rng_state, set_rng_state

OPTIMIZER_SUBDIR = "optimizer"


class FSDPDistribution(Distribution):
    """One torchrun process: its rank, the device mesh, and collectives over all ranks."""

    def setup(self, device: torch.device) -> torch.device:
        if "RANK" not in os.environ:
            raise KDTuneError("this recipe runs under torchrun: kdtune run --nproc_per_node N RECIPE --config ...")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = device
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        return device

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        reduced = values.to(self.device, copy=True)
        dist.all_reduce(reduced, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                     "min": dist.ReduceOp.MIN}[op])
        return reduced.to(values.device)

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; each rank's loss is already a share of the global mean.
        (loss * self.world_size).backward()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(norm, DTensor):  # per-shard partial norms, reduced over ranks
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def barrier(self) -> None:
        dist.barrier()

    @contextlib.contextmanager
    def gathered(self, model: nn.Module):
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:  # gathered once, outside inference mode: FSDP keeps these buffers for training
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not model, recurse=False)  # as `shard` set them

    def rank_state(self, obj) -> "PerRankState":
        return PerRankState(obj, self)

    def optimizer_state(self, model: nn.Module, optimizer) -> "ShardedOptimizerState":
        return ShardedOptimizerState(model, optimizer)

    def module_state(self, module: nn.Module) -> "ShardedModuleState":
        return ShardedModuleState(module)

    def rng_state(self) -> list:
        states = [None] * self.world_size
        dist.all_gather_object(states, get_rng_state())
        return states

    def set_rng_state(self, state: list) -> None:
        set_rng_state(state[self.rank])

    def load_recipe_state(self, folder: Path) -> dict:
        state = load_recipe_state(folder)
        saved_by = len(state["rng"]) if isinstance(state["rng"], list) else 1
        if state["optimizer"] != OPTIMIZER_SUBDIR or saved_by != self.world_size:
            raise KDTuneError(f"resume_from_checkpoint: '{folder}' was saved by a run on {saved_by} process(es) "
                              f"and this one has {self.world_size}; resume it on as many, with the same recipe")
        state["optimizer"] = Path(folder) / OPTIMIZER_SUBDIR
        return state


class PerRankState:
    """A stateful object saved as every rank's state (gathered to each, like the generators in
    ``rng_state``) and restored from its own rank's."""

    def __init__(self, obj, run_dist: FSDPDistribution):
        self.obj, self.dist = obj, run_dist

    def state_dict(self) -> list:
        states = [None] * self.dist.world_size
        dist.all_gather_object(states, self.obj.state_dict())
        return states

    def load_state_dict(self, states: list) -> None:
        self.obj.load_state_dict(states[self.dist.rank])


class ShardedOptimizerState:
    """The optimizer of a sharded model as a stateful object: its state is this rank's shard, which
    `sharded_saver` writes with ``torch.distributed.checkpoint``; loading reads the shards back
    from the folder ``FSDPDistribution.load_recipe_state`` puts in its place."""

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, folder: Path) -> None:
        shards = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(shards, checkpoint_id=folder)
        set_optimizer_state_dict(self.model, self.optimizer, shards)


class ShardedModuleState:
    """A sharded module's weights as a stateful object: saved whole (gathered on every rank, so the
    recipe state holds plain tensors) and loaded back into the shards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))


def shard_module(module: nn.Module | None, run_dist: FSDPDistribution) -> nn.Module | None:
    """A module trained beside the student (a hidden-state loss's projections) as one ``fully_shard``
    unit, so its gradients are reduced over the ranks like the student's; None stays None."""
    if module is None or not any(True for _ in module.parameters()):
        return module
    fully_shard(module.to(run_dist.device), mesh=run_dist.mesh,
                mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    return module


def shard(model: nn.Module, run_dist: FSDPDistribution, *, key: str) -> nn.Module:
    """``fully_shard`` each decoder layer, resharded after its forward, then the root, whose weights
    FSDP keeps gathered after the forward: the fused losses project through ``output_weight`` then.
    ``key`` names the model's config node in errors."""
    _check_nf4_shards(model, run_dist.world_size, key)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=run_dist.mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=run_dist.mesh, mp_policy=policy)
    return model


def _check_nf4_shards(model: nn.Module, world_size: int, key: str) -> None:
    """An NF4 weight splits into whole rows and whole quantization blocks per rank, or not at all."""
    for name, param in model.named_parameters():
        if type(param).__name__ != "NF4Tensor":
            continue
        rows, scaler_blocks = param.shape[0], param.n_blocks // param.scaler_block_size
        if rows % world_size or scaler_blocks % world_size:
            raise KDTuneError(
                f"{key}: the NF4 weight '{name}' {list(param.shape)} cannot be sharded over {world_size} processes: "
                f"its {rows} rows and {scaler_blocks} quantization blocks (of {param.scaler_block_size} x "
                f"{param.block_size} weights) must both divide by {world_size}; use a process count that divides "
                f"them or keep this model unquantized"
            )


def sharded_saver(checkpointer: HFCheckpointer, model: nn.Module, run_dist: FSDPDistribution):
    """The distributed counterpart of ``student_saver``: every rank writes its optimizer shard, rank 0
    gathers the full weights and writes the folder exactly as a single-device run would."""

    def save(*, recipe_state: dict, **step_or_epoch) -> Path:
        ((kind, n),) = step_or_epoch.items()
        final = checkpointer.output_dir / f"{kind}_{n}"
        staging = final.with_name(f".{final.name}.{OPTIMIZER_SUBDIR}")  # hidden: never read as a checkpoint
        if run_dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        run_dist.barrier()
        dcp.save(recipe_state["optimizer"], checkpoint_id=staging)
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if run_dist.is_main:
            student_saver(checkpointer, _unsharded_twin(model, weights))(
                recipe_state={**recipe_state, "optimizer": OPTIMIZER_SUBDIR}, **step_or_epoch,
                write_extra=lambda folder: staging.rename(folder / OPTIMIZER_SUBDIR))
        run_dist.barrier()
        return final

    return save


def _unsharded_twin(model: TransformerDecoder, weights: dict) -> TransformerDecoder:
    """A model of ``model``'s structure (LoRA layers included) holding the gathered ``weights``."""
    with torch.device("meta"):
        twin = TransformerDecoder(model.args)
        for name, lora in lora_modules(model).items():
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent), leaf, LoRALinear(
                lora.in_features, lora.out_features, lora.rank, lora.alpha, getattr(lora.dropout, "p", 0.0),
                bias=lora.bias is not None))
    twin.load_state_dict(weights, assign=True)
    return twin
