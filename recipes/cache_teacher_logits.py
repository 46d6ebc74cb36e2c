"""Cache the teacher's top-k log-probabilities over a dataset, for distillation without the teacher.

For every trained position (label != -100) of every sample, tokenized exactly as the distillation
run will tokenize it, the teacher's ``top_k`` largest log-probabilities at ``temperature`` and their
token ids go into safetensors shards in ``output_dir``, with an ``index.json`` recording what the
cache was made from. Point the distillation recipes' ``teacher_logits_cache`` at ``output_dir``.
With ``teacher_server`` in place of ``teacher_checkpointer`` the rows come from a served teacher
(vLLM; docs/serving.md) and no weight loads here.
An interrupted run resumes when rerun with the same config. Copy this file (`kdtune cp`) to change it.
"""

import kdtune.config
from kdtune import offline, training
from kdtune.checkpointing import check_same_tokens, require_comparable
from kdtune.config import instantiate
from kdtune.config.settings import CacheSettings
from kdtune.errors import KDTuneError
from kdtune.training.precision import resolve_device, resolve_dtype


@kdtune.config.parse(CacheSettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    # 1. Everything that can be checked before a weight is loaded.
    device, dtype = resolve_device(s.device), resolve_dtype(s.dtype)
    tokenizer = instantiate(cfg.tokenizer)
    if s.teacher_server is not None:
        return cache_from_server(cfg, s, tokenizer)
    if s.teacher_checkpointer is None:
        raise KDTuneError("teacher_checkpointer: required (the teacher's checkpoint), or teacher_server")
    teacher_checkpointer = instantiate(cfg.teacher_checkpointer)
    # The distillation reads the cache with this tokenizer (the student's): the teacher must share it.
    teacher_rows = teacher_checkpointer.model_args.vocab_size
    if teacher_rows != tokenizer.vocab_size:  # padded, or another vocabulary: only the tokenizers can tell
        require_comparable(tokenizer.path, teacher_checkpointer.checkpoint_dir, tokenizer.vocab_size, teacher_rows,
                           s.teacher_vocab_check)
    check_same_tokens(tokenizer.path, teacher_checkpointer.checkpoint_dir, min(tokenizer.vocab_size, teacher_rows))
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    training.check_positions(dataset, teacher_checkpointer)  # no sample longer than the teacher's positions
    training.check_memory_plan(device, dtype, None, teacher=teacher_checkpointer, teacher_node=cfg.get("teacher"))
    teacher_node = s.teacher or {}
    writer = offline.CacheWriter(
        s.output_dir, dataset, tokenizer, top_k=s.top_k, temperature=s.temperature, logprob_dtype=s.logprob_dtype,
        samples_per_shard=s.samples_per_shard,
        teacher={"checkpoint_dir": str(teacher_checkpointer.checkpoint_dir), "quantize": teacher_node.get("quantize"),
                 "dtype": teacher_node.get("dtype", s.dtype), "vocab_size": teacher_rows,
                 "vocab_check": s.teacher_vocab_check},
    )
    if writer.complete:
        print(f"{s.output_dir} already holds this cache, complete; nothing to do")
        return

    # 2. The frozen teacher, in its configured dtype or quantized.
    teacher = training.load_teacher(teacher_checkpointer, cfg.get("teacher"), device=device, dtype=dtype)

    # 3. One pass over the dataset, shard by shard.
    writer.write(teacher, batch_size=s.batch_size, pad_id=tokenizer.pad_id, device=device)
    print(f"Wrote the teacher's top-{writer.index['top_k']} log-probabilities of {writer.index['num_rows']} "
          f"tokens to {s.output_dir}")


def cache_from_server(cfg, s, tokenizer):
    """The same cache, its rows from a served teacher: checked (up, the model, the tokenizer) first."""
    if s.teacher_checkpointer is not None:
        raise KDTuneError("teacher_server and teacher_checkpointer are both set: cache one teacher (remove "
                          "teacher_checkpointer with ~teacher_checkpointer)")
    if s.top_k != s.teacher_server.top_k:
        raise KDTuneError(f"top_k: {s.top_k} is not teacher_server.top_k ({s.teacher_server.top_k}), what the "
                          f"server is asked for; set both alike")
    teacher = training.served_teacher(s.teacher_server, tokenizer, s.temperature)
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    writer = offline.CacheWriter(
        s.output_dir, dataset, tokenizer, top_k=s.top_k, temperature=s.temperature, logprob_dtype=s.logprob_dtype,
        samples_per_shard=s.samples_per_shard, teacher={**teacher.describe(), "vocab_check": "tokenizer"},
    )
    if writer.complete:
        print(f"{s.output_dir} already holds this cache, complete; nothing to do")
        return
    writer.write_served(teacher, batch_size=s.batch_size)
    print(f"Wrote the served teacher's top-{writer.index['top_k']} log-probabilities of "
          f"{writer.index['num_rows']} tokens to {s.output_dir}")


if __name__ == "__main__":
    main()
