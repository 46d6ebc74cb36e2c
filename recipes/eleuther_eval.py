"""Evaluate a checkpoint, or a base checkpoint plus a LoRA adapter, with the EleutherAI LM
Evaluation Harness (lm-eval).

Tasks are lm-eval's own or task YAMLs under ``include_path`` (local data files work offline).
Prints lm-eval's results table and writes ``${output_dir}/results.json``. Copy this file
(`kdtune cp`) to change how it works.
"""

from pathlib import Path

from omegaconf import OmegaConf

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
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed


@kdtune.config.parse
def main(cfg):
    device, dtype = resolve_device(cfg.get("device")), resolve_dtype(cfg.get("dtype", "fp32"))
    seed = set_seed(cfg.get("seed", 0))
    tasks = kd_eval.task_list(cfg.tasks)
    task_manager = kd_eval.task_manager(cfg.get("include_path"), include_defaults=cfg.get("include_default_tasks", True))
    kd_eval.check_tasks(task_manager, tasks)

    tokenizer = instantiate(cfg.tokenizer)
    model = load_model(cfg.checkpoint_dir, dtype=dtype, device=device)
    if cfg.get("adapter_dir"):
        load_peft_adapter(model, cfg.adapter_dir)
    lm = kd_eval.KDTuneLM(model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.get("max_seq_len"),
                          max_gen_toks=cfg.get("max_new_tokens", 256), seed=seed)

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        num_fewshot=cfg.get("num_fewshot"),
        limit=cfg.get("limit"),
        gen_kwargs=OmegaConf.to_container(cfg.gen_kwargs) if cfg.get("gen_kwargs") else None,
        apply_chat_template=cfg.get("apply_chat_template", False),
        fewshot_as_multiturn=cfg.get("fewshot_as_multiturn", False),
        log_samples=cfg.get("log_samples", False),
        bootstrap_iters=cfg.get("bootstrap_iters", 100000),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    path = kd_eval.save_results(results, Path(cfg.output_dir) / "results.json", log_samples=cfg.get("log_samples", False))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
