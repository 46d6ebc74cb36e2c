"""Training a small byte-level BPE tokenizer with a ChatML chat template, saved in the Hugging Face
layout (``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``).

The embedded demo and the recipe tests pretrain tiny models from scratch and need a tokenizer
that fits their data; real models bring their own.
"""

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML: each turn is "<|im_start|>{role}\n{content}<|im_end|>\n"; replies are marked with
# {% generation %} so the trained-token mask is explicit.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_chatml_tokenizer(texts: Iterable[str], out_dir, *, vocab_size: int = 512) -> Path:
    """Train on ``texts`` and write the tokenizer files into ``out_dir`` (created if needed)."""
    tok = Tokenizer(models.BPE())
    # Digits stay single tokens (as in Llama 3 and Qwen), so numbers are spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"eos_token": IM_END, "pad_token": PAD, "chat_template": CHATML_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": [tok.token_to_id(IM_END), tok.token_to_id(PAD)], "pad_token_id": tok.token_to_id(PAD)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
