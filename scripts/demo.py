"""The embedded end-to-end workflow behind `make demo`, on a laptop CPU with nothing to download.

The task is two-digit addition as chats ("What is 47 + 38?" -> "85"). The story is the usual one
for distillation: a teacher that has seen plenty of data, a student with only a small labeled set,
and plenty of unlabeled prompts.

 1. data: chats for pretraining, a small labeled chat set, unlabeled prompts, and 300 held-out
    problems that no training set contains; a tokenizer trained on them (ChatML, digits as tokens)
 2. a teacher pretrained briefly from scratch (full_finetune_single_device), LoRA-finetuned on the
    labeled chats (lora_finetune_single_device); it answers the unlabeled prompts (generate)
 3. per seed: a student (3 layers, 64 wide: a quarter of the teacher) pretrained from scratch on a
    few problems, then three students trained for the same 3,200 steps of 16 chats from it:
    student_sft  supervised fine-tuning on the labeled chats alone (the baseline)
    student_kd   knowledge_distillation_single_device on labeled + teacher-answered chats
                 (forward KL to the teacher's distributions, kd_ratio 1)
    student_gkd  on_policy_distillation_single_device on the same chats: on half the steps the
                 student answers the prompts itself and the teacher grades every token (forward KL)
 4. every model scored on the held-out problems: exact match of its greedy answer (eleuther_eval)
    and its per-token KL to the teacher on the held-out chats
 5. a table of mean ± standard deviation over the seeds, the ordering checked at every seed,
    demo_output/summary.json with every per-seed figure, and one seed's loss curves (kdtune plot)

``--task running_sums`` runs the same pipeline on sums of three numbers written as running totals
("What is 47 + 38 + 21?" -> "85, 106"), where a student's early slip spoils its later totals: the
case for on-policy distillation (into demo_output_running_sums/; `make demo` runs both tasks).

Every run goes through `kdtune run` with a shipped config plus overrides, printed as it starts.
The teacher is made once; the seeds vary each student's initial weights, data order and sampling.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdtune.checkpointing import write_random_checkpoint
from kdtune.datasets import arithmetic_rows
from kdtune.tokenization.build import train_chatml_tokenizer

# Two tasks. addition: one answer. running_sums: three numbers summed left to right, the answer
# writing both running totals ("What is 47 + 38 + 21?" -> "85, 106"), so a student that slips on the
# first total carries its own mistake into the second: the case on-policy distillation is made for
# (the student trains on its own partial answers). The settings below are the same for both, chosen
# before either was measured, except the teacher's pretraining on running sums: at addition's 1,200
# steps that teacher answered 9% of the unlabeled prompts right (its loss still falling), so it
# pretrains 4x longer; that was set before any running-sums student was scored.
TASKS = {"addition": {"rows": dict(max_digits=2, ops="+"), "answer_tokens": 8, "out": "demo_output",
                      "teacher_pretrain_steps": 1200, "gkd_margin": -5.0},
         "running_sums": {"rows": dict(max_digits=2, ops="+", terms=3), "answer_tokens": 12,
                          "out": "demo_output_running_sums", "teacher_pretrain_steps": 4800, "gkd_margin": 5.0}}
OUT = Path(TASKS["addition"]["out"]).resolve()
SIZES = {  # rows of each data set
    "teacher_pretrain": 20000, "student_pretrain": 1000, "labeled": 400, "unlabeled": 8000, "heldout": 300,
}
TEACHER = dict(layers=3, hidden=128, heads=4, kv_heads=2)
STUDENT = dict(layers=3, hidden=64, heads=4, kv_heads=2)  # a quarter of the teacher's parameters
VOCAB = 320  # the tokenizer has fewer ids; the embeddings are padded past them
STUDENT_PRETRAIN_STEPS = 100
BATCH = 64  # the teacher's
STUDENT_STEPS, STUDENT_BATCH = 3200, 16
# What keeps the students' runs off the knife edge (see the README): a warmup of a tenth of the run
# (Adam's first update at the full rate knocked the pretrained student far off), decoupled weight
# decay, a student deep enough to learn the carry (3 layers), and enough updates at a high enough
# rate that every seed gets past the plateau before it learns to carry, well before the rate decays.
# Both distilled students learn from the teacher's distributions alone (forward KL, kd_ratio 1).
STUDENT_TRAINING = [f"batch_size={STUDENT_BATCH}", "optimizer.lr=0.005",
                    f"lr_scheduler.num_warmup_steps={STUDENT_STEPS // 10}", "optimizer.weight_decay=0.1"]
STUDENT_SETTINGS = {"sft": STUDENT_TRAINING, "kd": [*STUDENT_TRAINING, "kd_ratio=1.0"],
                    "gkd": [*STUDENT_TRAINING, "lmbda=0.5", "kd_loss=forward_kl", "~kd_loss.beta", "kd_ratio=1.0"]}
# each student's recipe, config and data (the labeled chats, or labeled + teacher-answered)
STUDENT_RUNS = {"sft": ("full_finetune_single_device", "tiny/full_finetune_single_device", "sft_steps"),
                "kd": ("knowledge_distillation_single_device", "tiny/KD_full_single_device", "kd_steps"),
                "gkd": ("on_policy_distillation_single_device", "tiny/GKD_single_device", "kd_steps")}
STUDENTS = tuple(f"student_{kind}" for kind in STUDENT_RUNS)
# The ordering every seed must show: KD beats SFT by the 5 points that count as a win; GKD is, on
# addition, level with KD (a gap under 5 points either way is no win) or ahead, and on running sums
# ahead by 5 points (the task's "gkd_margin").
KD_MARGIN = 5.0


def hf_config(layers, hidden, heads, kv_heads) -> dict:
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": VOCAB, "max_position_embeddings": 256, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "initializer_range": 0.02}


class Jobs:
    """`kdtune` commands run as soon as the ones they need are done, ``parallel`` at a time, each
    with ``threads`` threads. Tiny models gain little from a second thread, so by default every
    run has one and two run side by side on a 2-core CPU. The thread count changes round-off only."""

    def __init__(self, parallel: int, threads: int):
        self.parallel, self.env = parallel, {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.pending: list[tuple[str, list, tuple]] = []

    def add(self, name: str, *args, after: tuple[str, ...] = ()) -> str:
        self.pending.append((name, [str(a) for a in args], after))
        return name

    def run(self) -> None:
        """Run every pending job; on a failure, print its log's tail and stop the demo."""
        done, running = set(), {}
        while self.pending or running:
            ready = [j for j in self.pending if set(j[2]) <= done]
            while ready and len(running) < self.parallel:
                name, args, _ = job = ready.pop(0)
                self.pending.remove(job)
                print(f"  $ kdtune {' '.join(args)}", flush=True)
                log = OUT / "logs" / f"{name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as f:
                    running[name] = (subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", *args], stdout=f,
                                                      stderr=subprocess.STDOUT, env=self.env), log)
            time.sleep(0.2)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0:
                    for other, _ in running.values():
                        other.kill()
                    print(log.read_text()[-3000:], file=sys.stderr)
                    sys.exit(f"demo: a command failed (exit {proc.returncode}); full log: {log}")
                done.add(name)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_rows(task: dict) -> list[dict]:
    """SIZES["heldout"] distinct problems of the test split."""
    rows, seen = [], set()
    for row in arithmetic_rows(20 * SIZES["heldout"], split="test", seed=1, **task["rows"]):
        if row["messages"][0]["content"] not in seen and len(rows) < SIZES["heldout"]:
            seen.add(row["messages"][0]["content"])
            rows.append(row)
    return rows


def train_rows(num_rows: int, seed: int, held_out: set, task: dict) -> list[dict]:
    """``num_rows`` problems of the train split, none of them a held-out question."""
    rows = [r for r in arithmetic_rows(2 * num_rows, seed=seed, **task["rows"])
            if r["messages"][0]["content"] not in held_out]
    return rows[:num_rows]


def make_data(task: dict) -> dict:
    data = OUT / "data"
    heldout = held_out_rows(task)
    questions = {r["messages"][0]["content"] for r in heldout}
    files = {
        "teacher_pretrain": write_jsonl(data / "teacher_pretrain.jsonl",
                                        train_rows(SIZES["teacher_pretrain"], 1, questions, task)),
        "student_pretrain": write_jsonl(data / "student_pretrain.jsonl",
                                        train_rows(SIZES["student_pretrain"], 2, questions, task)),
        "labeled": write_jsonl(data / "labeled.jsonl", train_rows(SIZES["labeled"], 3, questions, task)),
        "unlabeled": write_jsonl(data / "unlabeled.jsonl", [{"messages": r["messages"][:1]}
                                                           for r in train_rows(SIZES["unlabeled"], 4, questions, task)]),
        "heldout_chats": write_jsonl(data / "heldout_chats.jsonl", heldout),
        "heldout": write_jsonl(data / "heldout.jsonl", [
            {"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in heldout]),
    }
    task_file = OUT / "tasks" / "arithmetic_heldout.yaml"
    task_file.parent.mkdir(parents=True, exist_ok=True)
    task_file.write_text(
        "task: arithmetic_heldout\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {files['heldout']}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: []\n  max_gen_toks: {task['answer_tokens']}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    texts = [m["content"] for r in arithmetic_rows(3000, seed=5, **task["rows"]) for m in r["messages"]]
    files["tokenizer"] = train_chatml_tokenizer(texts + ["user assistant system"], data / "tokenizer", vocab_size=300)
    return files


def init_model(name: str, dims: dict, tokenizer: Path, seed: int) -> Path:
    path = write_random_checkpoint(hf_config(**dims), OUT / "models" / f"{name}_init", seed=seed)
    for f in tokenizer.iterdir():
        shutil.copy(f, path / f.name)
    return path


def repeated(name: str, path: Path, rows: int) -> Path:
    """``path``'s rows cycled to ``rows`` rows: one epoch of it is exactly the step budget."""
    lines = path.read_text().splitlines()
    return write_jsonl(OUT / "data" / f"{name}.jsonl", [json.loads(lines[i % len(lines)]) for i in range(rows)])


def run_dir(name: str) -> Path:
    return OUT / "runs" / name


def final(name: str) -> Path:
    return max(run_dir(name).glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))


def train(jobs: Jobs, recipe: str, config: str, name: str, checkpoint, data: Path, *overrides, after=()) -> str:
    """A training run through `kdtune run`, started once the jobs in ``after`` are done; ``final(name)``
    is its last checkpoint."""
    return jobs.add(name, "run", recipe, "--config", config, f"output_dir={run_dir(name)}",
                    f"checkpointer.checkpoint_dir={checkpoint}", f"dataset.data_files={data}",
                    "save_every_n_steps=null", *overrides, after=after)


def train_student(jobs: Jobs, kind: str, name: str, start: Path, teacher: Path, seed: int, settings=None,
                  after=(), answer_tokens: int = 8) -> str:
    """One student run of ``kind`` (sft, kd, gkd) from ``start``, with the demo's settings or others;
    an on-policy student writes answers of up to ``answer_tokens`` tokens."""
    recipe, config, data = STUDENT_RUNS[kind]
    chats = [] if kind == "gkd" else ["dataset=chat"]  # GKD reads the chats' prompts and replies itself
    teacher_args = [] if kind == "sft" else [f"teacher_checkpointer.checkpoint_dir={teacher}"]
    if kind == "gkd":
        teacher_args.append(f"generation.max_new_tokens={answer_tokens}")
    return train(jobs, recipe, config, name, start, OUT / "data" / f"{data}.jsonl", *chats, *teacher_args,
                 *(STUDENT_SETTINGS[kind] if settings is None else settings), f"seed={seed}", after=after)


def exact_match(name: str) -> float:
    results = json.loads((OUT / "eval" / name / "results.json").read_text())["results"]["arithmetic_heldout"]
    return 100 * results["exact_match,none"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description="kdtune's embedded end-to-end demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per run (default 1: two runs side by side; with more, one at a time)")
    parser.add_argument("--task", choices=list(TASKS), default="addition",
                        help="addition (default; into demo_output/) or running_sums (into demo_output_running_sums/)")
    args = parser.parse_args()
    task = TASKS[args.task]
    global OUT
    OUT = Path(task["out"]).resolve()
    shutil.rmtree(OUT, ignore_errors=True)
    began = time.time()
    jobs = Jobs(parallel=2 if args.threads == 1 else 1, threads=args.threads)

    print("1. data and tokenizer", flush=True)
    files = make_data(task)
    teacher_init = init_model("teacher", TEACHER, files["tokenizer"], seed=0)
    chats = ["dataset=chat", f"batch_size={BATCH}"]
    pretrain = [*chats, "optimizer.lr=0.003", "lr_scheduler.num_warmup_steps=20"]
    repeated("sft_steps", files["labeled"], STUDENT_STEPS * STUDENT_BATCH)

    print(f"2. the teacher: pretrained, LoRA-finetuned on the labeled chats, answering the unlabeled prompts; "
          f"meanwhile students pretrain and the SFT baselines train (seeds {args.seeds})", flush=True)
    full, lora = "full_finetune_single_device", "lora_finetune_single_device"
    train(jobs, full, "tiny/full_finetune_single_device", "teacher_pretrain", teacher_init,
          repeated("teacher_pretrain_steps", files["teacher_pretrain"], task["teacher_pretrain_steps"] * BATCH),
          *pretrain)
    student_pretrain_data = repeated("student_pretrain_steps", files["student_pretrain"], STUDENT_PRETRAIN_STEPS * BATCH)
    for seed in args.seeds:
        start = init_model(f"student_s{seed}", STUDENT, files["tokenizer"], seed=100 + seed)
        train(jobs, full, "tiny/full_finetune_single_device", f"student_pretrain_s{seed}", start,
              student_pretrain_data, *pretrain, f"seed={seed}")
        train_student(jobs, "sft", f"student_sft_s{seed}", run_dir(f"student_pretrain_s{seed}") / "epoch_1", None,
                      seed, after=(f"student_pretrain_s{seed}",))
    train(jobs, lora, "tiny/lora_finetune_single_device", "teacher_lora", run_dir("teacher_pretrain") / "epoch_1",
          repeated("teacher_lora_steps", files["labeled"], 100 * BATCH), *chats, "optimizer.lr=0.001",
          after=("teacher_pretrain",))
    teacher = run_dir("teacher_lora") / "epoch_1"
    jobs.add("teacher_answers", "run", "generate", "--config", "tiny/generate", f"checkpoint_dir={teacher}",
             "prompt=null", f"messages_file={files['unlabeled']}", "batch_size=500",
             f"max_new_tokens={task['answer_tokens']}",
             f"output_dir={OUT / 'teacher_answers'}", after=("teacher_lora",))
    jobs.run()

    print(f"3. distilled students, {STUDENT_STEPS} steps each like the SFT baselines", flush=True)
    kd_data = write_jsonl(OUT / "data" / "kd.jsonl", [
        json.loads(line) for f in (files["labeled"], OUT / "teacher_answers" / "generations.jsonl")
        for line in f.read_text().splitlines()])
    repeated("kd_steps", kd_data, STUDENT_STEPS * STUDENT_BATCH)
    for seed in args.seeds:
        for kind in ("kd", "gkd"):
            train_student(jobs, kind, f"student_{kind}_s{seed}", run_dir(f"student_pretrain_s{seed}") / "epoch_1",
                          teacher, seed, answer_tokens=task["answer_tokens"])
    jobs.run()

    print("4. every model on the held-out problems: exact match (eleuther_eval) and KL to the teacher", flush=True)
    models = {"teacher": teacher, **{f"{s}_s{seed}": final(f"{s}_s{seed}") for seed in args.seeds for s in STUDENTS}}
    for name, folder in models.items():
        jobs.add(f"eval_{name}", "run", "eleuther_eval", "--config", "tiny/eval", f"checkpoint_dir={folder}",
                 "tasks=[arithmetic_heldout]", f"include_path={OUT / 'tasks'}", f"output_dir={OUT / 'eval' / name}",
                 "apply_chat_template=true", "batch_size=100")
    jobs.run()
    import kdtune
    from kdtune.eval.teacher_kl import held_out_scores

    tokenizer, teacher_model = kdtune.load_tokenizer(teacher), kdtune.load_model(teacher)
    scores = {name: {"exact_match": round(exact_match(name), 2),
                     "kl_to_teacher": round(held_out_scores(folder, teacher_model, tokenizer,
                                                            files["heldout_chats"])["kl_to_teacher"], 4)}
              for name, folder in models.items()}

    print("5. summary", flush=True)
    per_seed = {s: {seed: scores[f"{s}_s{seed}"] for seed in args.seeds} for s in STUDENTS}
    holds = {seed: {"kd_beats_sft_by_5": per_seed["student_kd"][seed]["exact_match"]
                    >= per_seed["student_sft"][seed]["exact_match"] + KD_MARGIN,
                    "gkd_vs_kd": per_seed["student_gkd"][seed]["exact_match"]
                    >= per_seed["student_kd"][seed]["exact_match"] + task["gkd_margin"]} for seed in args.seeds}
    summary = {"task": args.task, "teacher": scores["teacher"], "seeds": args.seeds, "threads": args.threads,
               "students": {s: {"per_seed": per_seed[s], **{
                   f"{metric}_{stat}": round(value, 3)
                   for metric in ("exact_match", "kl_to_teacher")
                   for stat, value in zip(("mean", "sd"), mean_sd([v[metric] for v in per_seed[s].values()]))}}
                   for s in STUDENTS},
               "ordering": holds, "ordering_holds": all(all(h.values()) for h in holds.values()),
               "seconds": round(time.time() - began)}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot = subprocess.run([sys.executable, "-m", "kdtune.cli.main", "plot", run_dir(f"student_kd_s{args.seeds[0]}"),
                           "--out", OUT / "loss_curves.png"], capture_output=True, text=True)
    if plot.returncode != 0:
        print(plot.stderr[-2000:], file=sys.stderr)

    print(f"\n{'model':<12} {'held-out exact match':>28} {'held-out KL to teacher':>26}   per seed (exact match)")
    print(f"{'teacher':<12} {scores['teacher']['exact_match']:>27.1f}% {0:>26.3f}")
    for s in STUDENTS:
        st = summary["students"][s]
        seeds = "  ".join(f"{v['exact_match']:.1f}" for v in per_seed[s].values())
        print(f"{s:<12} {st['exact_match_mean']:>20.1f} ± {st['exact_match_sd']:>4.1f}% "
              f"{st['kl_to_teacher_mean']:>18.3f} ± {st['kl_to_teacher_sd']:.3f}   {seeds}")
    for seed, h in holds.items():
        print(f"seed {seed}: KD >= SFT + {KD_MARGIN:g}: {'yes' if h['kd_beats_sft_by_5'] else 'NO'}; "
              f"GKD >= KD {task['gkd_margin']:+g}: {'yes' if h['gkd_vs_kd'] else 'NO'}")
    print(f"{summary['seconds']} s in all ({args.threads} thread(s) per run); summary: {OUT / 'summary.json'}, "
          f"loss curves: {OUT / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
