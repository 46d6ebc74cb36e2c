"""``kdtune run eleuther_eval`` offline on local tasks: a multiple-choice task and a generate_until
(exact match) task, on a base checkpoint plus a LoRA adapter."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.cli_utils import assert_user_error, run_kdtune
from tests.eval.conftest import write_tasks

pytest.importorskip("lm_eval", reason="evaluation needs the eval extra (lm-eval)")

from lm_eval.api.instance import Instance  # noqa: E402

from kdtune.checkpointing import load_model  # noqa: E402
from kdtune.errors import KDTuneError  # noqa: E402
from kdtune.eval import KDTuneLM, save_results, task_manager  # noqa: E402
from kdtune.tokenization import load_tokenizer  # noqa: E402


def _eval(*overrides):
    return run_kdtune("run", "eleuther_eval", "--config", "tiny/eval", "tasks=[tiny_choice,tiny_sums]", *overrides)


def test_eval_of_base_plus_adapter_runs_offline_and_answers_as_the_merged_model(tmp_path, qwen_checkpoint, lora_step):
    tasks = write_tasks(tmp_path / "tasks")
    proc = _eval(f"checkpoint_dir={qwen_checkpoint}", f"adapter_dir={lora_step}", f"include_path={tasks}",
                 f"output_dir={tmp_path / 'out'}", "log_samples=true")
    assert proc.returncode == 0, proc.stderr
    assert "tiny_choice" in proc.stdout and "exact_match" in proc.stdout  # the printed table

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["n-samples"]["tiny_choice"]["effective"] == 6 and results["n-samples"]["tiny_sums"]["effective"] == 5
    assert 0 <= results["results"]["tiny_choice"]["acc,none"] <= 1
    assert 0 <= results["results"]["tiny_sums"]["exact_match,none"] <= 1

    # Every logged response is what the merged checkpoint answers to the same request.
    merged = KDTuneLM(load_model(lora_step), load_tokenizer(lora_step), batch_size=4, max_length=256)
    choice = [s for s in results["samples"]["tiny_choice"]]
    args = [tuple(a) for s in choice for a in s["arguments"]]
    want = merged.loglikelihood([Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)])
    have = [tuple(r[0]) for s in choice for r in s["resps"]]
    assert [g for _, g in have] == [g for _, g in want]
    np.testing.assert_allclose([lp for lp, _ in have], [lp for lp, _ in want], rtol=1e-5, atol=1e-3)
    sums = results["samples"]["tiny_sums"]
    want = merged.generate_until([Instance("generate_until", {}, tuple(s["arguments"][0]), i) for i, s in enumerate(sums)])
    assert [s["resps"][0][0] for s in sums] == want


def test_unknown_task_is_a_user_error(tmp_path, qwen_checkpoint):
    tasks = write_tasks(tmp_path / "tasks")
    proc = _eval(f"checkpoint_dir={qwen_checkpoint}", f"include_path={tasks}", "tasks=[tiny_choice,tiny_sumz]",
                 f"output_dir={tmp_path / 'out'}")
    assert_user_error(proc, "tasks:", "'tiny_sumz'", "did you mean 'tiny_sums'")
    assert not (tmp_path / "out").exists()


def test_results_file_is_plain_json_and_keeps_samples_only_when_asked(tmp_path):
    results = {"results": {"t": {"acc,none": np.float32(0.5), "n": np.int64(3)}}, "samples": {"t": [{"x": 1}]},
               "tags": {"a"}}
    plain = json.loads(save_results(results, tmp_path / "r.json").read_text())
    assert plain == {"results": {"t": {"acc,none": 0.5, "n": 3}}, "tags": ["a"]}
    with_samples = json.loads(save_results(results, tmp_path / "s.json", log_samples=True).read_text())
    assert with_samples["samples"] == {"t": [{"x": 1}]}


def test_missing_include_path_is_a_user_error(tmp_path):
    with pytest.raises(KDTuneError, match="include_path: no such folder"):
        task_manager(str(tmp_path / "nowhere"), include_defaults=False)


def test_without_lm_eval_the_recipe_says_what_to_install(tmp_path):
    # A None entry in sys.modules makes `import lm_eval` fail as if the package were absent.
    code = ("import sys; sys.modules['lm_eval'] = None; from kdtune.cli.main import main; "
            f"sys.exit(main(['run', 'eleuther_eval', '--config', 'tiny/eval', 'output_dir={tmp_path}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert_user_error(proc, "pip install 'kdtune[eval]'")
