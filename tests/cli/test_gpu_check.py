"""scripts/gpu_check.sh, the check a GPU machine runs, checked on the CPU: its dry run runs every
section at its smallest (the fused loss against the float64 reference for each divergence, dense
and top-k; each single-device recipe in bf16; the distributed recipes on 2 gloo processes;
generation; the KD-step benchmark) and writes one JSON of results."""

import json
import subprocess

import torch

from tests.cli_utils import REPO


def test_the_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["ok"]
    sections = report["sections"]
    assert set(sections) == {"losses", "recipes", "fsdp", "generation", "bench"}
    checks = sections["losses"]["checks"]
    assert {(c["divergence"], c["teacher"], c["dtype"]) for c in checks} == {
        (d, t, p) for d in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
        for t in ("dense", "top-k") for p in ("float32", "bfloat16")}
    assert max(c["errors"]["kd"] for c in checks if c["dtype"] == "float32") < 2e-4
    assert set(sections["recipes"]["runs"]) == {"full_finetune_single_device", "lora_finetune_single_device",
                                               "knowledge_distillation_single_device",
                                               "on_policy_distillation_single_device", "cache_teacher_logits", "generate"}
    assert sections["fsdp"]["processes"] == 2 and len(sections["fsdp"]["runs"]) == 3
    assert [r["form"] for r in sections["bench"]["rows"]] == ["full", "chunked", "fused"]


def test_without_a_gpu_it_says_so_unless_dry():
    if torch.cuda.is_available():
        return
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
