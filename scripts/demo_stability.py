"""How much a round-off perturbation moves the demo's students, under the old and the new settings.

Run after `make demo` (it reuses demo_output/: the data, the teacher and one seed's pretrained
student). Each of the three students (SFT, KD, GKD) is trained from that same start twice — as the
demo does, and from start weights moved by one ulp each in a random direction (with ``--threads``,
also with two threads: a different summation order in every matmul) — and scored by held-out exact
match. The spread of the scores is what a 1e-7 change of the inputs can do to a result.

    .venv/bin/python scripts/demo_stability.py [--seed 0] [--threads]

"before": the demo's settings up to commit 62db3c7 (one warmup step, so Adam's first update is
at the full rate; no weight decay). "after": the settings the demo uses now (scripts/demo.py).
"""

import argparse
import json
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from demo import OUT, STUDENT_SETTINGS, Jobs, exact_match, run_dir, train_student

# The old demo's students: 800 steps of 64 (the same samples as 1600 of 32), lr 1e-3 from the
# second step on, no weight decay; KD at kd_ratio 0.5 and GKD with JSD (beta 0.5), the configs' own.
BEFORE = ["batch_size=64", "optimizer.lr=0.001", "lr_scheduler.num_warmup_steps=1", "optimizer.weight_decay=0.0"]
SETTINGS = {"before": {"sft": BEFORE, "kd": BEFORE, "gkd": [*BEFORE, "lmbda=0.5"]}, "after": STUDENT_SETTINGS}
PERTURBATIONS = ("1 thread", "2 threads", "1 ulp")


def one_ulp(source, target, seed: int = 0):
    """``source``'s checkpoint with every weight moved by one ulp, up or down at random."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for path in target.glob("*.safetensors"):
        moved = {}
        for name, w in load_file(path).items():
            up = torch.rand(w.shape, generator=generator) < 0.5
            moved[name] = torch.nextafter(w, torch.where(up, torch.inf, -torch.inf).to(w.dtype))
        save_file(moved, path, metadata={"format": "pt"})
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="which of the demo's seeds to start from")
    parser.add_argument("--threads", action="store_true", help="also train with two threads")
    args = parser.parse_args()
    perturbations = PERTURBATIONS if args.threads else tuple(p for p in PERTURBATIONS if p != "2 threads")
    start = run_dir(f"student_pretrain_s{args.seed}") / "epoch_1"
    teacher = run_dir("teacher_lora") / "epoch_1"
    if not start.is_dir() or not teacher.is_dir():
        sys.exit("demo_stability: run `make demo` first (it needs demo_output/)")
    starts = {"1 thread": start, "2 threads": start, "1 ulp": one_ulp(start, OUT / "stability" / "start_1ulp")}
    names = []
    for threads in (1, 2):
        jobs = Jobs(parallel=2 if threads == 1 else 1, threads=threads)
        for perturbation in perturbations:
            if (perturbation == "2 threads") != (threads == 2):
                continue
            for setting, by_student in SETTINGS.items():
                for student, settings in by_student.items():
                    name = f"stability/{setting}_{student}_{perturbation.replace(' ', '_')}"
                    train_student(jobs, student, name, starts[perturbation], teacher, args.seed, settings)
                    jobs.add(f"eval_{name}", "run", "eleuther_eval", "--config", "tiny/eval",
                             f"checkpoint_dir={run_dir(name) / 'epoch_1'}", "tasks=[arithmetic_heldout]",
                             f"include_path={OUT / 'tasks'}", f"output_dir={OUT / 'eval' / name}",
                             "apply_chat_template=true", "batch_size=100", after=(name,))
                    names.append((setting, student, perturbation, name))
        jobs.run()

    scores = {}
    for setting, student, perturbation, name in names:
        scores.setdefault(setting, {}).setdefault(student, {})[perturbation] = round(exact_match(name), 2)
    (OUT / "stability" / "summary.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(f"\nheld-out exact match from the seed-{args.seed} pretrained student under round-off perturbations")
    print(f"{'settings':<8} {'student':<8} " + " ".join(f"{p:>10}" for p in perturbations) + f" {'spread':>8}")
    for setting, by_student in scores.items():
        for student, values in by_student.items():
            spread = max(values.values()) - min(values.values())
            print(f"{setting:<8} {student:<8} " + " ".join(f"{values[p]:>9.1f}%" for p in perturbations)
                  + f" {spread:>7.1f}")
    print(f"summary: {OUT / 'stability' / 'summary.json'}")


if __name__ == "__main__":
    main()
