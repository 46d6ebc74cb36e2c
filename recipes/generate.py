"""Generate text from a checkpoint, or a base checkpoint plus a LoRA adapter.

The config gives ``prompt`` (a string, or a list of them, tokenized as plain text), ``messages``
(a chat, or a list of chats, rendered by the tokenizer's chat template with the generation prompt),
or ``messages_file`` (a JSON/JSONL file of ``{"messages": [...]}`` rows; a final assistant turn is
replaced by the model's). Prompts are completed in batches of ``batch_size``; generation stops at the
tokenizer's end-of-turn / EOS ids or after ``max_new_tokens``. Writes ``${output_dir}/generations.json``
and, for ``messages_file``, ``${output_dir}/generations.jsonl`` with the completed chats — a dataset
for sequence-level distillation (the teacher answers unlabeled prompts). Copy this file
(`kdtune cp`) to change how it works.
"""

import json
import os
import time
from pathlib import Path

import torch

import kdtune.config
from kdtune.checkpointing import HFCheckpointer, load_model, load_peft_adapter, scored_vocab_size
from kdtune.config import instantiate
from kdtune.config.settings import GenerateSettings
from kdtune.datasets.messages import chat_messages
from kdtune.datasets.rows import load_rows
from kdtune.errors import KDTuneError
from kdtune.generation import generate
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed


MAX_PRINTED = 8


def _as_list(value, is_one) -> list:
    return [value] if is_one(value) else list(value)


def _file_chats(path) -> list[list[dict]]:
    """The prompt turns of each row of a chat file: everything before a final assistant turn."""
    chats = []
    for row in load_rows("json", str(path)):
        try:
            if row.error:
                raise KDTuneError(row.error)
            chat = chat_messages(row.data)
        except KDTuneError as e:
            raise KDTuneError(f"messages_file: {row.where}: {e}") from None
        chats.append(chat[:-1] if chat[-1]["role"] == "assistant" else chat)
    return chats


def read_prompts(s: GenerateSettings, tokenizer) -> tuple[list, list[list[int]]]:
    """(the prompts as the config gives them, their token ids)."""
    given = [key for key in ("prompt", "messages", "messages_file") if getattr(s, key) is not None]
    if len(given) != 1:
        raise KDTuneError("prompt, messages, messages_file: set exactly one of them (the others to null)")
    prompt, messages = s.prompt, s.messages
    if given == ["messages_file"]:
        messages = _file_chats(s.messages_file)
    if prompt is not None:
        texts = _as_list(prompt, lambda v: isinstance(v, str))
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise KDTuneError(f"prompt: expected a non-empty string or a list of them, got {prompt!r}")
        return texts, [tokenizer.encode(t) for t in texts]
    if not isinstance(messages, list) or not messages:
        raise KDTuneError(
            f"messages: expected a chat (a list of {{role, content}}) or a list of chats, got {messages!r}"
        )
    chats = _as_list(messages, lambda v: isinstance(v[0], dict))
    for i, chat in enumerate(chats):
        if not isinstance(chat, list) or not chat or not all(isinstance(m, dict) and "role" in m for m in chat):
            raise KDTuneError(f"messages[{i}]: expected a non-empty list of {{role, content}} messages, got {chat!r}")
    return chats, [tokenizer.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]


def save_json(records: list[dict], path: Path) -> None:
    """Write through a temporary file, so the JSON is either the old one or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@kdtune.config.parse(GenerateSettings)  # checks every setting, then main(cfg, s)
def main(cfg, s):
    outputs = [Path(s.output_dir) / name for name in ("generations.json", "generations.jsonl")]
    if any(path.exists() for path in outputs):  # an earlier run's: never overwritten
        raise KDTuneError(f"output_dir: '{s.output_dir}' holds an earlier run's generations; choose another "
                          f"output_dir or remove them")
    device, dtype = resolve_device(s.device), resolve_dtype(s.dtype)
    seed = set_seed(s.seed)
    tokenizer = instantiate(cfg.tokenizer)
    sources, prompts = read_prompts(s, tokenizer)
    positions = HFCheckpointer(s.checkpoint_dir).model_args.max_position_embeddings
    if max(map(len, prompts)) + s.max_new_tokens > positions:  # checked before the weights load
        raise KDTuneError(f"max_new_tokens: a prompt of {max(map(len, prompts))} tokens plus {s.max_new_tokens} new ones "
                          f"exceeds max_position_embeddings={positions} of {s.checkpoint_dir}/config.json")

    model = load_model(s.checkpoint_dir, dtype=dtype, device=device)
    if s.adapter_dir:
        load_peft_adapter(model, s.adapter_dir)
    # sampled over the tokenizer's ids the model has rows for (markers past them, like Gemma 3's image token, never)
    vocab_size = scored_vocab_size(model.args.vocab_size, tokenizer.vocab_size, tokenizer.marker_ids)
    if vocab_size is None:
        raise KDTuneError(
            f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
            f"{model.args.vocab_size} ({s.checkpoint_dir}/config.json)"
        )

    start, records, generated = time.perf_counter(), [], 0
    generator = torch.Generator(device=device).manual_seed(seed)
    batch_size = s.batch_size or len(prompts)
    for first in range(0, len(prompts), batch_size):
        output = generate(
            model,
            prompts[first: first + batch_size],
            max_new_tokens=s.max_new_tokens,
            stop_ids=tokenizer.eos_ids,
            pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0],
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            vocab_size=vocab_size,
            generator=generator,
        )
        generated += int(output.completion_lens.sum())
        for source, ids, stopped in zip(sources[first:], output.completions, output.stopped.tolist()):
            text = tokenizer.decode(ids[:-1] if stopped else ids)
            records.append({"prompt": source, "completion": text, "completion_ids": ids, "stopped": stopped})
    seconds = time.perf_counter() - start

    for i, record in enumerate(records[:MAX_PRINTED]):
        print(f"--- completion {i} ---\n{record['completion']}")
    if len(records) > MAX_PRINTED:
        print(f"--- ({len(records) - MAX_PRINTED} more completions in the output files) ---")
    print(f"--- {generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} tokens/s) ---")
    path = Path(s.output_dir) / "generations.json"
    save_json(records, path)
    print(f"generations: {path}")
    if s.messages_file:
        chats = Path(s.output_dir) / "generations.jsonl"
        lines = [json.dumps({"messages": [*r["prompt"], {"role": "assistant", "content": r["completion"]}]},
                            ensure_ascii=False) for r in records]
        chats.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"completed chats: {chats}")


if __name__ == "__main__":
    main()
