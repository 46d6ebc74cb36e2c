"""Cut a smaller student out of a trained model: structured pruning by importance (the Minitron
workflow: prune, then distill the pruned model back with the KD recipes).

The importance of every part is measured on calibration data (any dataset component): layers by
Block Influence (``1 - cos`` of a layer's input and output hidden states, ShortGPT) or by the loss
increase when the layer is skipped; attention key/value groups, MLP channels and hidden channels by
their mean activations (Minitron). The least important ``num_layers_to_remove`` layers go (or one
``contiguous`` block), and ``intermediate_size``, ``num_attention_heads`` (whole key/value groups)
and ``hidden_size`` shrink to the most important channels and heads. The result is a Hugging Face
checkpoint in ``output_dir`` — loadable by ``kdtune.load_model`` and transformers, the student of a
``knowledge_distillation_single_device`` run — with ``prune_report.json`` beside it: every score,
what was kept, and the parameter counts before and after. Copy this file (`kdtune cp`) to change it.
"""

import json
from dataclasses import asdict
from pathlib import Path

import kdtune.config
from kdtune import pruning
from kdtune.checkpointing import HFCheckpointer, write_checkpoint
from kdtune.config import instantiate
from kdtune.config.settings import PruneSettings
from kdtune.errors import KDTuneError
from kdtune.training.precision import resolve_device, resolve_dtype

REPORT = "prune_report.json"


@kdtune.config.parse(PruneSettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    # 1. Everything that can be checked before a weight loads: the targets against config.json,
    # the calibration data, and an output folder that does not exist yet (nothing is overwritten).
    device, dtype = resolve_device(s.device), resolve_dtype(s.dtype)
    if Path(s.output_dir).exists():
        raise KDTuneError(f"output_dir: '{s.output_dir}' exists; the pruned checkpoint goes into a new folder")
    checkpointer = HFCheckpointer(s.checkpoint_dir)
    args = checkpointer.model_args
    remove = pruning.check_targets(args, num_layers_to_remove=s.num_layers_to_remove, num_layers=s.num_layers,
                                   intermediate_size=s.intermediate_size, num_attention_heads=s.num_attention_heads,
                                   hidden_size=s.hidden_size)
    tokenizer = instantiate(cfg.tokenizer)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    batches = pruning.calibration_batches(dataset, num_samples=s.num_calibration_samples, batch_size=s.batch_size,
                                          pad_id=tokenizer.pad_id)

    # 2. The model, and the importance of its parts on the calibration tokens.
    model = checkpointer.load_model(dtype=dtype, device=device)
    importance = pruning.measure_importance(model, batches, device=device,
                                            skip_loss=s.layer_importance == "skip_loss")

    # 3. What to keep, the smaller weights and config.json, written as one new checkpoint folder.
    plan = pruning.plan_pruning(importance, args, remove=remove, layer_importance=s.layer_importance,
                                contiguous=s.contiguous, intermediate_size=s.intermediate_size,
                                num_attention_heads=s.num_attention_heads, hidden_size=s.hidden_size)
    state = pruning.prune_state_dict(model.state_dict(), args, plan)
    report = pruning.prune_report(importance, args, plan, asdict(s))
    write_checkpoint(Path(s.output_dir), pruning.pruned_config(checkpointer.config, args, plan), state,
                     source_dir=checkpointer.checkpoint_dir, max_shard_size=s.max_shard_size,
                     write_extra=lambda folder: (folder / REPORT).write_text(json.dumps(report, indent=1) + "\n"))
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    dropped = [layer["index"] for layer in report["layers"] if not layer["kept"]]
    print(f"Pruned {s.checkpoint_dir} to {s.output_dir}: {before:,} -> {after:,} parameters "
          f"({after / before:.1%}); layers dropped: {dropped or 'none'}; "
          + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in report["sizes"].items() if a != b or k == "num_layers"))


if __name__ == "__main__":
    main()
