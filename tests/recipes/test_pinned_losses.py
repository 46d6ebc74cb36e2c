"""Pinned per-step losses of short seeded runs of every training recipe, as torchtune's recipe tests
pin theirs: a change that alters the numerics of a step (loss math, normalization, accumulation,
clipping, optimizer or data order) fails here loudly, even when the relative checks still hold.

The values were recorded with the recipes as they stood before their training steps moved into the
recipe files, and are unchanged since. Re-record only for an intended numerical change:
``OMP_NUM_THREADS=1 .venv/bin/python -m tests.recipes.test_pinned_losses`` prints the table.
"""

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kdtune.datasets import write_arithmetic_jsonl
from kdtune.training import read_metrics
from tests.cli_utils import run_kdtune
from tests.recipes.conftest import base_overrides, build_world, kd_overrides

TORCHRUN = ("--nproc_per_node", "2", "--standalone")
KEYS = ("loss", "ce_loss", "kd_loss", "grad_norm")
STEPS = "max_steps_per_epoch=3"


def runs(world, chats) -> dict:
    """name -> (kdtune run arguments) of each pinned run."""
    kd, base = kd_overrides, base_overrides
    return {
        "full_accum": ("full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                       *base(world, "{out}"), STEPS, "batch_size=2", "gradient_accumulation_steps=2"),
        "lora": ("lora_finetune_single_device", "--config", "tiny/lora_finetune_single_device",
                 *base(world, "{out}"), STEPS),
        "kd_lora": ("knowledge_distillation_single_device", "--config", "tiny/KD_single_device",
                    *kd(world, "{out}"), STEPS),
        "kd_full_jsd_accum": ("knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
                              *kd(world, "{out}"), STEPS, "kd_loss=jsd", "batch_size=2",
                              "gradient_accumulation_steps=2"),
        "kd_chunked_tvd": ("knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
                           *kd(world, "{out}"), STEPS, "kd_loss=tvd", "loss_form=chunked"),
        "gkd": ("on_policy_distillation_single_device", "--config", "tiny/GKD_single_device",
                *kd(world, "{out}"), f"dataset.data_files={chats}", "max_steps_per_epoch=4"),
        "kd_cached": ("knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
                      *base(world, "{out}"), STEPS, "~teacher_checkpointer", "+teacher_logits_cache={out}_cache",
                      f"+cache_from={world['teacher']}"),
        "kd_distributed": (*TORCHRUN, "knowledge_distillation_distributed", "--config", "tiny/KD_distributed",
                           *kd(world, "{out}"), STEPS, "batch_size=2"),
        "lora_distributed": (*TORCHRUN, "lora_finetune_distributed", "--config", "tiny/lora_finetune_single_device",
                             *base(world, "{out}"), STEPS, "batch_size=2"),
    }


def run_pinned(args, out: Path) -> list[list[float]]:
    teacher = next((a.split("=", 1)[1] for a in args if a.startswith("+cache_from=")), None)
    if teacher is not None:  # first the teacher's top 16 into the cache the run reads
        args = [a for a in args if not a.startswith("+cache_from=")]
        options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
        cache = run_kdtune("run", "cache_teacher_logits", "--config", "tiny/cache_teacher_logits",
                           f"output_dir={out}_cache", f"teacher_checkpointer.checkpoint_dir={teacher}",
                           f"tokenizer.path={options['checkpointer.checkpoint_dir']}",
                           f"dataset.data_files={options['dataset.data_files']}", "top_k=16",
                           "logprob_dtype=fp16",  # the storage these losses were pinned with
                           env={"OMP_NUM_THREADS": "1"})
        assert cache.returncode == 0, cache.stderr[-3000:]
    # the one warmup step these losses were pinned with (the tiny configs now warm up over 10)
    proc = run_kdtune("run", *(a.replace("{out}", str(out)) for a in args), "lr_scheduler.num_warmup_steps=1",
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [[m.get(k) for k in KEYS] for m in read_metrics(out / "metrics.jsonl")]


# Recorded before the refactor that moved each training step into its recipe (see the module docstring).
PINNED = {
    "full_accum": [[5.703149080276489, None, None, 8.309950828552246], [5.795893669128418, None, None, 10.900279998779297], [5.437118768692017, None, None, 6.019547462463379]],
    "lora": [[5.70314884185791, None, None, 2.4925143718719482], [5.795894145965576, None, None, 3.474020004272461], [5.460343360900879, None, None, 1.7752164602279663]],
    "kd_lora": [[3.3977458477020264, 5.573437213897705, 1.222054362297058, 1.2582519054412842], [3.492748737335205, 5.664327144622803, 1.3211702108383179, 1.6657004356384277], [3.298720121383667, 5.325649738311768, 1.271790623664856, 0.8693166971206665]],
    "kd_full_jsd_accum": [[2.906433343887329, 5.573437213897705, 0.23942944407463074, 4.138742923736572], [2.9577337503433228, 5.664327383041382, 0.25114015489816666, 5.399865627288818], [2.78056800365448, 5.310122728347778, 0.2510131672024727, 2.9791316986083984]],
    "kd_chunked_tvd": [[3.0712921619415283, 5.573437213897705, 0.569146990776062, 4.136436939239502], [3.124885082244873, 5.664327621459961, 0.5854424834251404, 5.420130252838135], [2.9491302967071533, 5.311252117156982, 0.5870083570480347, 2.975893020629883]],
    # gkd re-pinned when sampling moved from torch.multinomial to inverse-CDF draws (the same distribution,
    # other draws): step 2, trained on the dataset's completions, kept its pinned values to the digit
    "gkd": [[0.24429848790168762, 5.477388381958008, 0.24429848790168762, 0.11814695596694946], [0.25114014744758606, 5.664327144622803, 0.25114014744758606, 0.18206365406513214], [0.2340066283941269, 5.525630950927734, 0.2340066283941269, 0.06633003056049347], [0.22999365627765656, 5.531589031219482, 0.22999365627765656, 0.05217147618532181]],
    "kd_cached": [[3.219102144241333, 5.573437213897705, 0.8647671341896057, 4.216587066650391], [3.319368600845337, 5.664327144622803, 0.9744102358818054, 5.278488636016846], [3.102243185043335, 5.304983615875244, 0.8995028138160706, 3.0485548973083496]],
    "kd_distributed": [[3.3977458477020264, 5.573437213897705, 1.2220544815063477, 1.2582520246505737], [3.4927488565444946, 5.664327383041382, 1.3211700916290283, 1.6657004356384277], [3.298720121383667, 5.3256494998931885, 1.2717906832695007, 0.8693167567253113]],
    "lora_distributed": [[5.703148603439331, None, None, 2.492514133453369], [5.795893907546997, None, None, 3.47402024269104], [5.460343360900879, None, None, 1.7752164602279663]],
}


@pytest.fixture(scope="module")
def pinned_world(world):
    return world, write_arithmetic_jsonl(world["root"] / "pinned_chats.jsonl", 64, seed=1, max_digits=2)


@pytest.mark.parametrize("name", list(PINNED))
def test_per_step_losses_are_pinned(name, pinned_world, tmp_path):
    world, chats = pinned_world
    got = run_pinned(runs(world, chats)[name], tmp_path / name)
    expected = PINNED[name]
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        for key, a, b in zip(KEYS, g, e):
            if b is None:
                continue  # not a metric of this recipe
            assert a is not None, (name, step, key)
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-7,
                                       msg=f"{name} step {step} {key}")


if __name__ == "__main__":  # print the table to paste into PINNED
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "world").mkdir()
        world = build_world(root / "world")
        chats = write_arithmetic_jsonl(root / "world" / "pinned_chats.jsonl", 64, seed=1, max_digits=2)
        for name, args in runs(world, chats).items():
            print(f"    {name!r}: {run_pinned(args, root / name)!r},", file=sys.stdout, flush=True)
