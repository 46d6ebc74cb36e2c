"""A Llama-3-style tokenizer (BOS added by the post-processor, header tokens, ``<|eot_id|>``) built
here with the `tokenizers` library, and a Llama-3-like template marking replies with
``{% generation %}``, so transformers' assistant mask is an independent reference for ours."""

import json

import pytest

from kdtune.tokenization import load_tokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = 'Today is ' + (date_string | default('1 Jan 2025')) + '.' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate user/assistant/user/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CONVERSATIONS = [
    [
        {"role": "system", "content": " Answer briefly. "},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": " Paris. "},
        {"role": "user", "content": "And of Italy, in two words?"},
        {"role": "assistant", "content": "Rome, Italy."},
    ],
    [
        {"role": "user", "content": "Say hello\n\n"},
        {"role": "assistant", "content": "\n\nhello there"},
    ],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [m["content"] for conv in CONVERSATIONS for m in conv] * 20 + ["system user assistant Today is"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    path = tmp_path_factory.mktemp("llama3_style")
    tok.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference chat renderer")
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


def test_special_tokens(checkpoint):
    tok = load_tokenizer(checkpoint)
    eot, end = (tok.encode(t, add_special_tokens=False)[0] for t in ("<|eot_id|>", "<|end_of_text|>"))
    assert tok.eos_id == eot and set(tok.eos_ids) == {eot, end}
    assert tok.pad_id == eot  # no pad token named: padding reuses EOS (always masked)
    assert tok.encode("hello")[0] == tok.bos_id  # the post-processor adds BOS
    assert tok.decode(tok.encode("hello there"), skip_special_tokens=True) == "hello there"


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_matches_transformers(checkpoint, hf, index, add_generation_prompt):
    tok = load_tokenizer(checkpoint)
    messages = CONVERSATIONS[index][:-1] if add_generation_prompt else CONVERSATIONS[index]
    out = hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=not add_generation_prompt,
    )
    assert tok.apply_chat_template(messages, add_generation_prompt) == list(out["input_ids"])
    if not add_generation_prompt:
        ids, mask = tok.tokenize_messages(messages)
        assert ids == list(out["input_ids"])
        assert mask == [bool(m) for m in out["assistant_masks"]]
        pieces = [tok.decode([i for i, m in zip(ids, mask) if m])]
        assert pieces == ["".join(m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant")]


def test_template_raise_exception_is_a_user_error(checkpoint):
    from kdtune.errors import KDTuneError

    tok = load_tokenizer(checkpoint)
    with pytest.raises(KDTuneError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
