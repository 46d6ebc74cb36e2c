"""The embedded end-to-end workflow behind `make demo`, on a laptop CPU with nothing to download.

The task is two-digit addition as chats ("What is 47 + 38?" -> "85"). The story is the usual one
for distillation: a teacher that has seen plenty of data, a student with only a small labeled set,
and plenty of unlabeled prompts.

 1. data: chats for pretraining, a small labeled chat set, unlabeled prompts, a held-out split;
    a tokenizer trained on them (ChatML template, digits as single tokens)
 2. a teacher and a smaller student pretrained briefly from scratch (full_finetune_single_device):
    the teacher on many problems, the student on a few
 3. the teacher LoRA-finetuned on the labeled chats (lora_finetune_single_device)
 4. the teacher answers the unlabeled prompts (generate)
 5. students, each trained for the same number of steps from the same pretrained student:
    student_sft  supervised fine-tuning on the labeled chats alone (the baseline)
    student_kd   knowledge_distillation_single_device on labeled + teacher-answered chats
    student_gkd  on_policy_distillation_single_device on the same chats: on half the steps the
                 student answers the prompts itself, and the teacher grades every token
                 (generalized JSD) of the student's answers or of the chats' replies
 6. eleuther_eval exact match on the held-out split for the teacher and every student
 7. a table, demo_output/summary.json and the loss curves (kdtune plot)

Every stage runs through `kdtune run` with a shipped config plus overrides, printed as it runs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kdtune.checkpointing import write_random_checkpoint
from kdtune.datasets import arithmetic_rows
from kdtune.tokenization.build import train_chatml_tokenizer

OUT = Path("demo_output").resolve()
TASK = dict(max_digits=2, ops="+")
SIZES = {  # rows of each data set
    "teacher_pretrain": 20000, "student_pretrain": 1000, "labeled": 400, "unlabeled": 8000, "heldout": 300,
}
TEACHER = dict(layers=3, hidden=128, heads=4, kv_heads=2)
STUDENT = dict(layers=2, hidden=96, heads=4, kv_heads=2)
VOCAB = 320  # the tokenizer has fewer ids; the embeddings are padded past them
TEACHER_PRETRAIN_STEPS = 1200
STUDENT_PRETRAIN_STEPS = 100
STUDENT_STEPS = 800
BATCH = 64


def hf_config(layers, hidden, heads, kv_heads) -> dict:
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": VOCAB, "max_position_embeddings": 256, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "initializer_range": 0.02}


# Tiny models gain nothing from a second thread, and two single-threaded runs side by side use
# both cores of a laptop-class CPU fully, so every stage runs with one thread, two at a time.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args, log: Path) -> tuple[subprocess.Popen, Path]:
    """Start one `kdtune` command, echoed; its output goes to a log file."""
    print(f"  $ kdtune {' '.join(str(a) for a in args)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env=ENV)
    return proc, log


def wait(*started: tuple[subprocess.Popen, Path]) -> None:
    for proc, log in started:
        if proc.wait() != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            sys.exit(f"demo: a command failed (exit {proc.returncode}); full log: {log}")


def kdtune(*args, log: Path) -> None:
    wait(start(*args, log=log))


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data() -> dict:
    """Disjoint draws of the train split (by seed) and the held-out test split."""
    data = OUT / "data"
    files = {
        "teacher_pretrain": write_jsonl(data / "teacher_pretrain.jsonl",
                                        arithmetic_rows(SIZES["teacher_pretrain"], seed=1, **TASK)),
        "student_pretrain": write_jsonl(data / "student_pretrain.jsonl",
                                        arithmetic_rows(SIZES["student_pretrain"], seed=2, **TASK)),
        "labeled": write_jsonl(data / "labeled.jsonl", arithmetic_rows(SIZES["labeled"], seed=3, **TASK)),
        "unlabeled": write_jsonl(data / "unlabeled.jsonl",
                                 [{"messages": r["messages"][:1]} for r in arithmetic_rows(SIZES["unlabeled"], seed=4, **TASK)]),
    }
    heldout = arithmetic_rows(SIZES["heldout"], split="test", seed=1, **TASK)
    files["heldout"] = write_jsonl(data / "heldout.jsonl", [
        {"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in heldout])
    task = (OUT / "tasks" / "arithmetic_heldout.yaml")
    task.parent.mkdir(parents=True, exist_ok=True)
    task.write_text(
        "task: arithmetic_heldout\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {files['heldout']}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: []\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    texts = [m["content"] for r in arithmetic_rows(3000, seed=5, **TASK) for m in r["messages"]]
    files["tokenizer"] = train_chatml_tokenizer(texts + ["user assistant system"], data / "tokenizer", vocab_size=300)
    return files


def init_model(name: str, dims: dict, tokenizer: Path, seed: int) -> Path:
    path = write_random_checkpoint(hf_config(**dims), OUT / "models" / f"{name}_init", seed=seed)
    for f in tokenizer.iterdir():
        shutil.copy(f, path / f.name)
    return path


def train(recipe: str, config: str, name: str, checkpoint: Path, data: Path, *overrides: str):
    """Start a training run through `kdtune run`; `final(name)` is its last checkpoint once done."""
    return start("run", recipe, "--config", config, f"output_dir={OUT / 'runs' / name}",
                 f"checkpointer.checkpoint_dir={checkpoint}", f"dataset.data_files={data}",
                 "save_every_n_steps=null", *overrides, log=OUT / "logs" / f"{name}.log")


def final(name: str) -> Path:
    return max((OUT / "runs" / name).glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))


def evaluate(name: str, checkpoint: Path):
    return start("run", "eleuther_eval", "--config", "tiny/eval", f"checkpoint_dir={checkpoint}",
                 "tasks=[arithmetic_heldout]", f"include_path={OUT / 'tasks'}", f"output_dir={OUT / 'eval' / name}",
                 "apply_chat_template=true", "batch_size=100", log=OUT / "logs" / f"eval_{name}.log")


def exact_match(name: str) -> float:
    results = json.loads((OUT / "eval" / name / "results.json").read_text())["results"]["arithmetic_heldout"]
    return 100 * results["exact_match,none"]


def repeated(name: str, path: Path, rows: int) -> Path:
    """``path``'s rows cycled to ``rows`` rows: one epoch of it is exactly the step budget."""
    lines = path.read_text().splitlines()
    return write_jsonl(OUT / "data" / f"{name}.jsonl", [json.loads(lines[i % len(lines)]) for i in range(rows)])


def main() -> None:
    argparse.ArgumentParser(description="kdtune's embedded end-to-end demo").parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    began = time.time()

    print("1. data and tokenizer", flush=True)
    files = make_data()
    teacher_init = init_model("teacher", TEACHER, files["tokenizer"], seed=0)
    student_init = init_model("student", STUDENT, files["tokenizer"], seed=1)

    print("2. pretrain a teacher and a student from scratch", flush=True)
    chats = ["dataset=chat", f"batch_size={BATCH}"]
    pretrain = [*chats, "optimizer.lr=0.003", "lr_scheduler.num_warmup_steps=20"]
    wait(train("full_finetune_single_device", "tiny/full_finetune_single_device", "teacher_pretrain", teacher_init,
               repeated("teacher_pretrain_steps", files["teacher_pretrain"], TEACHER_PRETRAIN_STEPS * BATCH),
               *pretrain),
         train("full_finetune_single_device", "tiny/full_finetune_single_device", "student_pretrain", student_init,
               repeated("student_pretrain_steps", files["student_pretrain"], STUDENT_PRETRAIN_STEPS * BATCH),
               *pretrain))

    print("3. LoRA-finetune the teacher on the labeled chats; meanwhile the SFT baseline student", flush=True)
    wait(train("lora_finetune_single_device", "tiny/lora_finetune_single_device", "teacher_lora",
               final("teacher_pretrain"), repeated("teacher_lora_steps", files["labeled"], 100 * BATCH), *chats,
               "optimizer.lr=0.001"),
         train("full_finetune_single_device", "tiny/full_finetune_single_device", "student_sft",
               final("student_pretrain"), repeated("sft_steps", files["labeled"], STUDENT_STEPS * BATCH), *chats))
    teacher = final("teacher_lora")

    print("4. the teacher answers the unlabeled prompts", flush=True)
    kdtune("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={teacher}", "prompt=null",
           f"messages_file={files['unlabeled']}", "batch_size=500", "max_new_tokens=8",
           f"output_dir={OUT / 'teacher_answers'}", log=OUT / "logs" / "teacher_answers.log")
    kd_data = write_jsonl(OUT / "data" / "kd.jsonl", [
        json.loads(line) for f in (files["labeled"], OUT / "teacher_answers" / "generations.jsonl")
        for line in f.read_text().splitlines()])

    print(f"5. distilled students, {STUDENT_STEPS} steps each like the SFT baseline", flush=True)
    teacher_args = [f"teacher_checkpointer.checkpoint_dir={teacher}"]
    kd_steps = repeated("kd_steps", kd_data, STUDENT_STEPS * BATCH)
    wait(train("knowledge_distillation_single_device", "tiny/KD_full_single_device", "student_kd",
               final("student_pretrain"), kd_steps, *chats, *teacher_args),
         train("on_policy_distillation_single_device", "tiny/GKD_single_device", "student_gkd",
               final("student_pretrain"), kd_steps, f"batch_size={BATCH}", "lmbda=0.5", "optimizer.lr=0.001",
               *teacher_args))

    print("6. evaluate on the held-out split (exact match)", flush=True)
    models = {"teacher": teacher, "student_sft": final("student_sft"), "student_kd": final("student_kd"),
              "student_gkd": final("student_gkd")}
    names = list(models)
    for pair in (names[:2], names[2:]):
        wait(*(evaluate(name, models[name]) for name in pair))
    scores = {name: exact_match(name) for name in names}

    print("7. summary", flush=True)
    summary = {name: {"exact_match": round(score, 2)} for name, score in scores.items()}
    summary["seconds"] = round(time.time() - began)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    kdtune("plot", OUT / "runs" / "student_kd", "--out", OUT / "loss_curves.png", log=OUT / "logs" / "plot.log")
    print(f"\n{'model':<14} {'held-out exact match':>22}")
    for name, score in scores.items():
        print(f"{name:<14} {score:>21.1f}%")
    for name in ("student_kd", "student_gkd"):
        print(f"{name} vs student_sft: {scores[name] - scores['student_sft']:+.1f} points")
    print(f"{summary['seconds']} s in all; summary: {OUT / 'summary.json'}, loss curves: {OUT / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
