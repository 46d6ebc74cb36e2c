"""Real weights on a CPU: SmolLM2-135M-Instruct converted from its GGUF file gives transformers'
logits (transformers loading the converted folder, and the GGUF file itself through its own GGUF
loader), the same token ids and chat rendering, the same greedy generations; a short distillation
from it into a pruned copy of itself brings the student closer to it than SFT does in as many steps."""

import json

import pytest
import torch

import kdtune
from kdtune.checkpointing.from_gguf import convert_gguf
from kdtune.checkpointing.to_gguf import export_gguf
from kdtune.datasets import chat_dataset, instruction_prompts, write_instruction_jsonl
from kdtune.generation import generate
from kdtune.training import read_metrics
from tests.cli_utils import assert_user_error, run_kdtune

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
pytestmark = pytest.mark.real
ENV = {"OMP_NUM_THREADS": "1"}
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a red fruit."}],
    [{"role": "user", "content": "Write one sentence about bees."}, {"role": "assistant", "content": "Bees make honey."},
     {"role": "user", "content": "And about ants? Count: 1, 22, 333."}],
]
TEXTS = ["Hello world 123, how are you?", "  leading spaces\n\nnew lines\ttabs", "Ünïcödé ñ 你好 🙂",
         "x=42; y = x**2 // 7 ...", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def hf(smollm2, gguf_file):
    """transformers' tokenizer and model from the GGUF file, and its model from the converted folder."""
    folder, name = gguf_file.parent, gguf_file.name
    return {"tokenizer": transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name),
            "from_gguf": transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                          dtype=torch.float32).eval(),
            "from_folder": transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()}


def test_the_converted_folder_describes_smollm2(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == \
        ("llama", 30, 576, 9, 3, 49152, True)
    assert config["rms_norm_eps"] == 1e-5


def test_tokens_and_chat_rendering_equal_transformers(smollm2, hf):
    ours, theirs = kdtune.load_tokenizer(smollm2), hf["tokenizer"]
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    for chat in CHATS:
        for prompt in (True, False):
            rendered = theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            assert ours.chat_template.render(chat, add_generation_prompt=prompt) == rendered
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == theirs(rendered).input_ids
    assert ours.eos_id == theirs.eos_token_id == 2 and ours.vocab_size == len(theirs)


def test_logits_equal_transformers(smollm2, hf):
    model, tok = kdtune.load_model(smollm2), kdtune.load_tokenizer(smollm2)
    for chat in CHATS:
        ids = torch.tensor([tok.apply_chat_template(chat, add_generation_prompt=True)])
        with torch.no_grad():
            ours = model(ids)
            for name in ("from_folder", "from_gguf"):
                torch.testing.assert_close(ours, hf[name](ids).logits, atol=1e-4, rtol=1e-4, msg=name)


def test_greedy_generation_equals_transformers(smollm2, hf):
    model, tok = kdtune.load_model(smollm2), kdtune.load_tokenizer(smollm2)
    prompts = [tok.apply_chat_template(chat, add_generation_prompt=True) for chat in CHATS]
    out = generate(model, prompts, max_new_tokens=24, temperature=0.0, stop_ids=tok.eos_ids, pad_id=tok.pad_id,
                   vocab_size=tok.vocab_size)
    for prompt, completion in zip(prompts, out.completions):
        with torch.no_grad():
            theirs = hf["from_folder"].generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)
        assert completion == theirs[0, len(prompt):].tolist()



def test_the_student_goes_back_out_as_gguf(smollm2, hf, tmp_path):
    """kdtune convert to-gguf of the converted folder: f32 is the same model and tokenizer again, for
    kdtune's reader and for transformers' GGUF loader (same logits, same greedy tokens); q8_0 and
    q4_0 stay within a bound of KL to it (nats per token on the chats; measured 2.5e-3 and 0.59)."""
    model, tok = kdtune.load_model(smollm2), kdtune.load_tokenizer(smollm2)
    prompts = [tok.apply_chat_template(chat, add_generation_prompt=True) for chat in CHATS]
    for qtype in ("f32", "q8_0", "q4_0"):  # through the API (tests/checkpointing runs the same calls by the CLI)
        export_gguf(smollm2, tmp_path / f"student.{qtype}.gguf", qtype=qtype)
        convert_gguf(tmp_path / f"student.{qtype}.gguf", tmp_path / qtype, dtype=torch.float32)
    back = kdtune.load_model(tmp_path / "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="student.f32.gguf",
                                                               dtype=torch.float32).eval()
    quantized = {qtype: kdtune.load_model(tmp_path / qtype) for qtype in ("q8_0", "q4_0")}
    kls = {qtype: [] for qtype in quantized}
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = model(ids)
            assert torch.equal(back(ids), expected)
            torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-4, rtol=1e-4)
            if prompt is prompts[0]:  # greedy tokens through transformers' loader (each family's are in tests/checkpointing)
                greedy = theirs.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=list(tok.eos_ids),
                                         pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
                assert greedy == generate(model, [prompt], max_new_tokens=16, temperature=0.0, stop_ids=tok.eos_ids,
                                          pad_id=tok.pad_id, vocab_size=tok.vocab_size).completions[0]
            p = expected.log_softmax(-1)
            for qtype, model_q in quantized.items():
                q = model_q(ids).log_softmax(-1)
                kls[qtype].append((p.exp() * (p - q)).sum(-1).mean().item())
    mean = {qtype: sum(v) / len(v) for qtype, v in kls.items()}
    assert mean["q8_0"] < 0.01 and mean["q4_0"] < 1.0, mean
    again = kdtune.load_tokenizer(tmp_path / "f32")
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text), text
    for chat in CHATS:
        assert again.apply_chat_template(chat, add_generation_prompt=True) == \
            tok.apply_chat_template(chat, add_generation_prompt=True)


def test_bad_gguf_input_is_one_line_and_writes_nothing(gguf_file, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: 50_000_000])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(100))
    for bad, fragment in ((truncated, "truncated"), (garbage, "not a readable GGUF file"),
                          (tmp_path / "none.gguf", "no such file")):
        out = tmp_path / f"out_{bad.stem}"
        assert_user_error(run_kdtune("convert", "gguf", bad, out), str(bad), fragment)
        assert not out.exists() and not list(tmp_path.glob(f".out_{bad.stem}*"))


def teacher_rows(teacher, tok, chats_file) -> list:
    """Each held-out chat's ids, reply mask and the teacher's float64 log-probabilities there."""
    rows = []
    for sample in chat_dataset(tok, data_files=str(chats_file), source="jsonl"):
        ids, keep = torch.tensor([sample["tokens"]]), torch.tensor(sample["labels"]) != -100
        with torch.no_grad():
            rows.append((ids, keep, teacher(ids)[0, keep].double().log_softmax(-1)))
    return rows


def held_out_kl(student_dir, rows) -> float:
    """Mean KL(teacher || student) over the reply tokens of the held-out chats, in float64."""
    student = kdtune.load_model(student_dir)
    total = count = 0.0
    for ids, keep, log_p in rows:
        with torch.no_grad():
            log_q = student(ids)[0, keep].double().log_softmax(-1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += int(keep.sum())
    return total / count


def test_distilling_into_a_pruned_copy_gets_closer_to_the_teacher_than_sft(smollm2, tmp_path):
    # The student: SmolLM2 with 20 of its 30 layers (Block Influence on the training prompts).
    train, held_out = (write_instruction_jsonl(tmp_path / f"{split}_prompts.jsonl", n, split=split)
                       for split, n in (("train", 32), ("test", 12)))
    student = tmp_path / "student"
    proc = run_kdtune("run", "prune", "--config", "tiny/prune", f"checkpoint_dir={smollm2}", f"output_dir={student}",
                      "dataset=chat", f"dataset.data_files={train}", "dataset.source=jsonl", "num_layers=20",
                      "num_layers_to_remove=0",
                      "num_calibration_samples=32", env=ENV)
    assert proc.returncode == 0, proc.stderr
    # The teacher answers every prompt (greedy): the training and held-out chats.
    chats = {}
    for name, prompts in (("train", train), ("test", held_out)):
        proc = run_kdtune("run", "generate", "--config", "tiny/generate", f"checkpoint_dir={smollm2}",
                          f"tokenizer.path={smollm2}", "prompt=null", f"messages_file={prompts}",
                          "max_new_tokens=32", "batch_size=16", f"output_dir={tmp_path / ('answers_' + name)}", env=ENV)
        assert proc.returncode == 0, proc.stderr
        chats[name] = tmp_path / f"answers_{name}" / "generations.jsonl"
    common = (f"checkpointer.checkpoint_dir={student}", "dataset=chat", f"dataset.data_files={chats['train']}",
              "dataset.source=jsonl", "batch_size=4", "max_steps_per_epoch=8", "optimizer.lr=0.0005",
              "lr_scheduler.num_warmup_steps=0", "dataset.max_seq_len=160", "tokenizer.max_seq_len=160")
    runs = {"kd": ("knowledge_distillation_single_device", "tiny/KD_full_single_device",
                   f"teacher_checkpointer.checkpoint_dir={smollm2}"),
            "sft": ("full_finetune_single_device", "tiny/full_finetune_single_device")}
    for name, (recipe, config, *extra) in runs.items():
        proc = run_kdtune("run", recipe, "--config", config, f"output_dir={tmp_path / name}", *common, *extra, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert len(read_metrics(tmp_path / name / "metrics.jsonl")) == 8
    tok, teacher = kdtune.load_tokenizer(smollm2), kdtune.load_model(smollm2)
    rows = teacher_rows(teacher, tok, chats["test"])  # once, for the three students
    kl = {name: held_out_kl(folder, rows)
          for name, folder in (("pruned", student), ("sft", tmp_path / "sft" / "epoch_1"),
                               ("kd", tmp_path / "kd" / "epoch_1"))}
    print(f"held-out KL to the teacher: {kl}")
    assert kl["kd"] < kl["sft"] < kl["pruned"]
    assert len(instruction_prompts(12, split="test")) == 12
