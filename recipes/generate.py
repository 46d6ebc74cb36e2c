"""Generate text from a checkpoint, or a base checkpoint plus a LoRA adapter.

The config gives ``prompt`` (a string, or a list of them, tokenized as plain text) or ``messages``
(a chat, or a list of chats, rendered by the tokenizer's chat template with the generation prompt).
All prompts are completed as one batch; generation stops at the tokenizer's end-of-turn / EOS ids
or after ``max_new_tokens``. Prints the completions and writes ``${output_dir}/generations.json``.
Copy this file (`kdtune cp`) to change how it works.
"""

import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import kdtune.config
from kdtune.checkpointing import load_model, load_peft_adapter
from kdtune.config import instantiate
from kdtune.errors import KDTuneError
from kdtune.generation import generate
from kdtune.training.precision import resolve_device, resolve_dtype
from kdtune.training.rng import set_seed


def _as_list(value, is_one) -> list:
    return [value] if is_one(value) else list(value)


def read_prompts(cfg, tokenizer) -> tuple[list, list[list[int]]]:
    """(the prompts as the config gives them, their token ids)."""
    prompt = OmegaConf.to_container(cfg.prompt) if OmegaConf.is_config(cfg.get("prompt")) else cfg.get("prompt")
    messages = OmegaConf.to_container(cfg.messages) if OmegaConf.is_config(cfg.get("messages")) else cfg.get("messages")
    if (prompt is None) == (messages is None):
        raise KDTuneError("prompt, messages: set exactly one of them (the other to null)")
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


@kdtune.config.parse
def main(cfg):
    device, dtype = resolve_device(cfg.get("device")), resolve_dtype(cfg.get("dtype", "fp32"))
    seed = set_seed(cfg.get("seed", 0))
    tokenizer = instantiate(cfg.tokenizer)
    sources, prompts = read_prompts(cfg, tokenizer)

    model = load_model(cfg.checkpoint_dir, dtype=dtype, device=device)
    if cfg.get("adapter_dir"):
        load_peft_adapter(model, cfg.adapter_dir)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise KDTuneError(
            f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
            f"{model.args.vocab_size} ({cfg.checkpoint_dir}/config.json)"
        )

    start = time.perf_counter()
    output = generate(
        model,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0],
        temperature=cfg.get("temperature", 0.0),
        top_k=cfg.get("top_k"),
        top_p=cfg.get("top_p"),
        vocab_size=tokenizer.vocab_size,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    seconds = time.perf_counter() - start

    records = []
    for i, (source, ids, stopped) in enumerate(zip(sources, output.completions, output.stopped.tolist())):
        text = tokenizer.decode(ids[:-1] if stopped else ids)
        records.append({"prompt": source, "completion": text, "completion_ids": ids, "stopped": stopped})
        print(f"--- completion {i} ---\n{text}")
    generated = int(output.completion_lens.sum())
    print(f"--- {generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} tokens/s) ---")
    path = Path(cfg.output_dir) / "generations.json"
    save_json(records, path)
    print(f"generations: {path}")


if __name__ == "__main__":
    main()
