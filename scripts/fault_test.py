"""Kill -9 at scattered moments, resume each time, and check that nothing is lost.

For each recipe family (SFT, LoRA, KD on one process and on two, on-policy, the teacher-cache writer,
pruning) on the tests' tiny world, this runs the recipe once uninterrupted (the reference), then
again with SIGKILL at ``--kills`` moments, resuming after each (``resume_from_checkpoint=true``; the
cache writer and pruning are simply rerun), and checks that the interrupted run ends bitwise equal to
the reference: every ``.safetensors`` file (weights, adapters, cache shards) byte for byte, the
cache's index, and every logged metric except timings. It also checks that no temporary folder or
file of a killed write is left behind.

The kill moments: a few armed kill points (inside a checkpoint's write, inside a cache shard's write,
during validation, before on-policy generation; see scripts/fault_inject.py), the rest at random
times spread uniformly over the reference run's duration after its first step. A run that finishes
before its kill is compared too and counts as one more trial, not as a kill.

    python scripts/fault_test.py                      # every family, 20 kills each
    python scripts/fault_test.py --families kd cache --kills 5

Prints one row per family and exits 1 if any run differs; the figures are in docs/fault_test.md.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.recipes.conftest import build_world  # noqa: E402  (the tests' tiny world: data, tokenizer, models)

TIMINGS = {"tokens_per_second", "peak_memory_gb", "generation_tokens_per_second"}
INJECT = str(REPO / "scripts" / "fault_inject.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


@dataclass
class Family:
    """How to run one recipe family and what its finished output is."""

    recipe: str
    config: str
    overrides: list[str]
    points: list[str]  # armed kill points, "POINT:N"
    kind: str = "training"  # training (resumes), cache (reruns, index complete), prune (reruns, folder exists)
    epochs: int = 2
    distributed: bool = False  # two processes under torchrun


def families(world: dict, root: Path) -> dict[str, Family]:
    student, teacher, data = world["student"], world["teacher"], world["data"]
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                      {"role": "assistant", "content": r["output"]}]}) + "\n"
                             for r in json.loads(data.read_text())))
    train = ["checkpointer.checkpoint_dir=" + str(student), f"dataset.data_files={data}", "batch_size=4",
             "epochs=2", "save_every_n_steps=3", "log_every_n_steps=1"]
    kd = [*train, f"teacher_checkpointer.checkpoint_dir={teacher}"]
    validation = ["+validation.every_n_steps=4", "+validation.dataset._component_=alpaca",
                  f"+validation.dataset.data_files={data}", "+validation.dataset.max_seq_len=256",
                  "+validation.max_batches=4"]
    return {
        "sft": Family("full_finetune_single_device", "tiny/full_finetune_single_device", train,
                      ["checkpoint:1", "checkpoint:4"]),
        "lora": Family("lora_finetune_single_device", "tiny/lora_finetune_single_device", train,
                       ["checkpoint:2", "checkpoint:5"]),
        "kd": Family("knowledge_distillation_single_device", "tiny/KD_single_device", [*kd, *validation],
                     ["checkpoint:1", "checkpoint:3", "validation:2", "validation:9"]),
        "kd_distributed": Family("knowledge_distillation_distributed", "tiny/KD_distributed",
                                 [*kd, "batch_size=2", "epochs=1", *validation], ["checkpoint:2", "validation:5"],
                                 epochs=1, distributed=True),
        "on_policy": Family("on_policy_distillation_single_device", "tiny/GKD_single_device",
                            [*kd, f"dataset.data_files={chats}", "generation.max_new_tokens=6"],
                            ["checkpoint:1", "checkpoint:3", "generation:2", "generation:7"]),
        "cache": Family("cache_teacher_logits", "tiny/cache_teacher_logits",
                        [f"teacher_checkpointer.checkpoint_dir={teacher}", f"tokenizer.path={student}",
                         f"dataset.data_files={data}", "samples_per_shard=4", "batch_size=4"],
                        ["shard:1", "shard:5", "shard:12"], kind="cache"),
        "prune": Family("prune", "tiny/prune", [f"checkpoint_dir={teacher}", f"dataset.data_files={data}",
                                                "num_calibration_samples=64"], ["checkpoint:1"], kind="prune"),
    }


def command(family: Family, out: Path, resume: bool) -> list[str]:
    recipe = str(REPO / "recipes" / f"{family.recipe}.py")
    again = ["resume_from_checkpoint=true"] if resume and family.kind == "training" else []
    launcher = TORCHRUN if family.distributed else [sys.executable]
    return [*launcher, INJECT, recipe, "--config", family.config, f"output_dir={out}", *family.overrides, *again]


def start(family: Family, out: Path, resume: bool, point: str | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("KDTUNE_FAULT", None)
    if point:
        env["KDTUNE_FAULT"] = point
    log = out.parent / f"{out.name}.stderr"  # a file, not a pipe: progress bars would fill a pipe and block the run
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command(family, out, resume), env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                cwd=REPO)
    proc.log = log
    return proc


def kill_all(out: Path) -> None:
    """SIGKILL every process of the run at once, as a lost machine would: torchrun and its workers
    (which it starts in sessions of their own), found by the output folder on their command lines."""
    mark = f"output_dir={out}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone already


def finished(family: Family, out: Path) -> bool:
    if family.kind == "cache":
        index = out / "index.json"
        return index.is_file() and json.loads(index.read_text())["complete"]
    if family.kind == "prune":
        return out.is_dir()
    return (out / f"epoch_{family.epochs}").is_dir()


def outcome(family: Family, out: Path) -> dict:
    """What must be bitwise equal: every safetensors file's bytes, the cache index, the metrics."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}
    if family.kind == "training":
        files = {k: v for k, v in files.items() if k.startswith(f"epoch_{family.epochs}/")}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        files["metrics"] = json.dumps([{k: v for k, v in r.items() if k not in TIMINGS} for r in records]).encode()
    if family.kind == "cache":
        files["index.json"] = (out / "index.json").read_bytes()
    if family.kind == "prune":
        files.update({p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "prune_report.json"})
        report = json.loads((out / "prune_report.json").read_text())
        report["settings"].pop("output_dir")  # where it was written: the one thing that differs by design
        files["prune_report.json"] = json.dumps(report).encode()
    return files


def leftovers(out: Path) -> list[str]:
    """Temporary folders or files of a killed write, in the output folder or beside it."""
    found = [p for p in out.rglob("*") if ".tmp" in p.name]
    found += [p for p in out.parent.glob(f".{out.name}.tmp*")]
    return [str(p) for p in found]


def started(family: Family, out: Path) -> bool:
    """Whether the run has done real work yet: a step logged, a shard written (pruning: unobservable)."""
    if family.kind == "cache":
        return any(out.glob("shard*"))
    return family.kind == "training" and (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0


def run_to_end(family: Family, out: Path, resume: bool) -> tuple[float, float]:
    """Run to the end: (seconds in all, seconds until its first step or shard, half the run for pruning)."""
    begun, first = time.perf_counter(), None
    proc = start(family, out, resume, None)
    while proc.poll() is None:
        if first is None and started(family, out):
            first = time.perf_counter() - begun
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"{family.recipe} failed ({proc.returncode}):\n{proc.log.read_text()[-3000:]}")
    seconds = time.perf_counter() - begun
    return seconds, first if first is not None else seconds / 2


def test_family(name: str, family: Family, root: Path, kills: int, seed: int) -> dict:
    reference_dir = root / f"{name}_reference"
    began = time.perf_counter()
    duration, first = run_to_end(family, reference_dir, resume=False)
    reference = outcome(family, reference_dir)
    rng = random.Random(f"{seed}:{name}")
    points = iter(family.points[:kills])
    result = {"family": name, "kills": 0, "point_kills": 0, "time_kills": 0, "trials": 0, "equal": True,
              "leftovers": [], "reference_s": duration, "first_s": first}
    trial, out, resumed = 0, None, False
    attempts = 0
    while result["kills"] < kills and attempts < 10 * kills:  # a random moment may come after a run has ended
        attempts += 1
        point = next(points, None)
        how = "point" if point else "time"
        if out is None:
            trial, resumed = trial + 1, False
            out = root / f"{name}_trial{trial}"
        proc = start(family, out, resumed, point)
        if how == "time":
            try:
                proc.wait(timeout=rng.uniform(first, duration))
            except subprocess.TimeoutExpired:
                kill_all(out)
        proc.wait(timeout=900)
        kill_all(out)  # a worker whose launcher was killed outlives it
        err = proc.log.read_text()
        # one process dies by the signal; torchrun reports its killed worker and exits 1
        killed = proc.returncode == -signal.SIGKILL or family.distributed and proc.returncode == 1 and "SIGKILL" in err
        if proc.returncode != 0 and not killed:
            raise SystemExit(f"{name}: the run failed ({proc.returncode}) instead of stopping:\n{err[-3000:]}")
        if killed:
            result["kills"] += 1
            result["point_kills" if how == "point" else "time_kills"] += 1
        resumed = True
        if finished(family, out):  # done (before the kill, or killed after its last write): compare, next trial
            result["equal"] &= outcome(family, out) == reference
            result["leftovers"] += leftovers(out)
            result["trials"] += 1
            out = None
    if out is not None:  # the last trial: resume to the end, then compare
        run_to_end(family, out, resume=True)
        result["equal"] &= outcome(family, out) == reference
        result["leftovers"] += leftovers(out)
        result["trials"] += 1
    result["seconds"] = time.perf_counter() - began
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=None, help="default: all")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 moments per family (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill times")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kdtune_fault_"))
    try:
        world = build_world(root)
        chosen = families(world, root)
        names = args.families or list(chosen)
        print(f"{'family':<16}{'kills':>6}{'points':>8}{'random':>8}{'trials':>8}  {'bitwise equal':<14}"
              f"{'leftovers':>10}{'random window s':>17}{'total s':>9}", flush=True)
        failed = False
        for name in names:
            r = test_family(name, chosen[name], root, args.kills, args.seed)
            failed |= not r["equal"] or bool(r["leftovers"])
            window = f"{r['first_s']:.1f} - {r['reference_s']:.1f}"
            print(f"{name:<16}{r['kills']:>6}{r['point_kills']:>8}{r['time_kills']:>8}{r['trials']:>8}  "
                  f"{'yes' if r['equal'] else 'NO':<14}{len(r['leftovers']):>10}{window:>17}"
                  f"{r['seconds']:>9.0f}", flush=True)
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"work folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
