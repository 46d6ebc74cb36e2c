"""Evaluate a checkpoint, or a base checkpoint plus a LoRA adapter, with the EleutherAI LM
Evaluation Harness (lm-eval).

Tasks are lm-eval's own or task YAMLs under ``include_path`` (local data files work offline).
Prints lm-eval's results table and writes ``${output_dir}/results.json``. Copy this file
(`kdtune cp`) to change how it works.
"""

from pathlib import Path

import kdtune.config
from kdtune.errors import KDTuneError

try:
    import lm_eval
    from lm_eval.utils import make_table

    from kdtune import eval as kd_eval
except ImportError as e:  # lm-eval is an optional extra
    raise KDTuneError(f"eleuther_eval needs lm-eval ({e}): pip install 'kdtune[eval]'") from None
from kdtune.checkpointing import load_model, load_peft_adapter
from kdtune.config import instantiate
from kdtune.config.settings import EvalSettings
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed


@kdtune.config.parse(EvalSettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    if (Path(s.output_dir) / "results.json").exists():  # an earlier run's: never overwritten
        raise KDTuneError(f"output_dir: '{s.output_dir}' holds an earlier run's results.json; choose another "
                          f"output_dir or remove it")
    device, dtype = resolve_device(s.device), resolve_dtype(s.dtype)
    seed = set_seed(s.seed)
    tasks = kd_eval.task_list(cfg.tasks)
    task_manager = kd_eval.task_manager(s.include_path, include_defaults=s.include_default_tasks)
    kd_eval.check_tasks(task_manager, tasks)

    tokenizer = instantiate(cfg.tokenizer)
    model = load_model(s.checkpoint_dir, dtype=dtype, device=device)
    if s.adapter_dir:
        load_peft_adapter(model, s.adapter_dir)
    lm = kd_eval.KDTuneLM(model, tokenizer, batch_size=s.batch_size, max_length=s.max_seq_len,
                          max_gen_toks=s.max_new_tokens, seed=seed)

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        num_fewshot=s.num_fewshot,
        limit=int(s.limit) if s.limit is not None and s.limit >= 1 else s.limit,
        gen_kwargs=s.gen_kwargs,
        apply_chat_template=s.apply_chat_template,
        fewshot_as_multiturn=s.fewshot_as_multiturn,
        log_samples=s.log_samples,
        bootstrap_iters=s.bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    path = kd_eval.save_results(results, Path(s.output_dir) / "results.json", log_samples=s.log_samples)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
