"""Cross-tokenizer alignment and distillation with SmolLM2-135M-Instruct's real tokenizer (rebuilt
from its GGUF file) against Mistral v0.3's and Qwen2.5's, and one short run with the real teacher."""

import random
import shutil

import pytest

import kdtune
from kdtune.checkpointing import write_random_checkpoint
from kdtune.datasets import write_arithmetic_jsonl
from kdtune.tokenization.alignment import align_pieces, align_replies
from kdtune.tokenization.vocab_map import matched_tokens, token_bytes
from kdtune.training import read_metrics
from tests.cli_utils import run_kdtune
from tests.recipes.conftest import tiny_config
from tests.tokenization.test_alignment import ASSETS, check_partition, random_text


@pytest.mark.parametrize("other", ["mistral_v3_tokenizer", "qwen2_5_tokenizer"])
def test_smollm2_aligns_with_other_families(smollm2, other):
    smol, them = kdtune.load_tokenizer(smollm2), kdtune.load_tokenizer(ASSETS / other)
    rng = random.Random(2)
    for _ in range(200):
        text = random_text(rng)
        a = smol._tok.encode(text, add_special_tokens=False).offsets
        b = them._tok.encode(text, add_special_tokens=False).offsets
        check_partition(len(text), a, b, align_pieces(a, len(text), b, len(text), len(text)))
    # replies in each model's own template: SmolLM2's ChatML (with its default system turn) and the other's
    messages = [{"role": "user", "content": "Write 3 digits: "}, {"role": "assistant", "content": "1 2 3 — done ✓"}]
    sides = []
    for tok in (smol, them):
        text, spans = tok.render_with_spans(messages)
        sides.append((text, spans, tok._tok.encode(text, add_special_tokens=False)))
    aligned = align_replies(*sides)
    (s_text, _, s_enc), (t_text, _, t_enc) = sides
    assert s_text != t_text  # two templates
    pieces = [(s_text[s_enc.offsets[s0][0]:s_enc.offsets[s1 - 1][1]], t_text[t_enc.offsets[t0][0]:t_enc.offsets[t1 - 1][1]])
              for s0, s1, t0, t1 in aligned]
    assert all(x == y for x, y in pieces[:-1]) and "".join(x for x, _ in pieces[:-1]) == "1 2 3 — done ✓"
    assert pieces[-1][0] == "<|im_end|>"


def test_smollm2_and_qwen_share_most_byte_level_tokens(smollm2):
    smol, qwen = kdtune.load_tokenizer(smollm2), kdtune.load_tokenizer(ASSETS / "qwen2_5_tokenizer")
    student_ids, teacher_ids = matched_tokens(smol, qwen)
    s_bytes, t_bytes = token_bytes(smol)[0], token_bytes(qwen)[0]
    assert all(s_bytes[i] == t_bytes[j] for i, j in zip(student_ids, teacher_ids) if i != smol.eos_id)
    assert len(student_ids) > 0.5 * smol.vocab_size


def test_a_student_of_another_vocabulary_distills_from_the_real_teacher(smollm2, tmp_path):
    """A tiny random student that reads Mistral v0.3's vocabulary, two steps of hybrid ULD from the
    real SmolLM2-135M-Instruct on arithmetic chats: the run completes and its losses are finite."""
    student = write_random_checkpoint(dict(tiny_config(2, 64, 4, 2), vocab_size=32768), tmp_path / "student")
    for f in (ASSETS / "mistral_v3_tokenizer").iterdir():
        shutil.copy(f, student / f.name)
    chats = write_arithmetic_jsonl(tmp_path / "chats.jsonl", 16, seed=3, max_digits=2)
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config",
                      "smollm2/135M_to_mistral_vocab_KD_cross_tokenizer_single_device", f"output_dir={tmp_path / 'out'}",
                      f"checkpointer.checkpoint_dir={student}", f"teacher_checkpointer.checkpoint_dir={smollm2}",
                      f"teacher_tokenizer={smollm2}", f"dataset.data_files={chats}", "dataset.source=json",
                      "max_steps_per_epoch=2", "batch_size=4", "save_every_n_steps=null", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(metrics) == 2 and all(0 < m["kd_loss"] < 100 and 0 < m["ce_loss"] < 100 for m in metrics)
