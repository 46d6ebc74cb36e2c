"""Chat templates in the formats of Gemma (``<start_of_turn>``/``<end_of_turn>``, role ``model``),
Phi-3 (``<|user|>``/``<|end|>``) and Mistral (``[INST]``, replies ended by EOS), written here, with
tokenizers built here: kdtune renders them as transformers does, trains on exactly each reply and
its end-of-turn token, and stops generating on that token."""

import json

import pytest

from kdtune.tokenization import load_tokenizer

FAMILIES = {
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<image_soft_token>"],
        "bos": "<bos>", "eos": "<eos>", "end_of_turn": "<end_of_turn>",
        "template": (
            "{{ bos_token }}"
            "{% for message in messages %}"
            "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
        ),
    },
    "phi3": {
        "specials": ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"],
        "bos": "<s>", "eos": "<|endoftext|>", "end_of_turn": "<|end|>",
        "template": (
            "{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
        ),
    },
    "mistral": {
        "specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "bos": "<s>", "eos": "</s>", "end_of_turn": "</s>",
        "template": (
            "{{ bos_token }}"
            "{% for message in messages %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% else %}{{ message['content'] + eos_token }}{% endif %}"
            "{% endfor %}"
        ),
    },
}

CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 7 + 8?"},
    {"role": "assistant", "content": "15"},
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = FAMILIES[request.param]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CONVERSATION] * 20 + ["user model assistant What is And"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=spec["specials"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp(request.param)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": spec["bos"], "eos_token": spec["eos"], "chat_template": spec["template"],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tok.token_to_id(spec["eos"]), tok.token_to_id(spec["end_of_turn"])]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return request.param, path


def test_rendering_matches_transformers(family):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference chat renderer")
    name, path = family
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    tok = load_tokenizer(path)
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:-1], name != "mistral")):
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=True)
        assert tok.apply_chat_template(messages, prompt) == list(expected["input_ids"])


def test_trains_on_each_reply_and_its_end_of_turn(family):
    name, path = family
    tok = load_tokenizer(path)
    end = FAMILIES[name]["end_of_turn"]
    ids, mask = tok.tokenize_messages(CONVERSATION)
    trained = [i for i, m in zip(ids, mask) if m]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert tok.decode(trained) == "".join(reply + end for reply in replies)


def test_generation_stops_on_the_end_of_turn_token(family):
    name, path = family
    tok = load_tokenizer(path)
    assert tok.encode(FAMILIES[name]["end_of_turn"], add_special_tokens=False)[0] in tok.eos_ids



def test_markers_are_the_special_tokens_without_a_role(family):
    """Gemma 3's image placeholder is a marker (distillation may leave it out of the scored ids when a
    model has no row for it); BOS, EOS and end-of-turn never are."""
    name, path = family
    tok = load_tokenizer(path)
    ids = {t: tok.encode(t, add_special_tokens=False)[0] for t in FAMILIES[name]["specials"]}
    roles = {ids[FAMILIES[name][key]] for key in ("bos", "eos", "end_of_turn")}
    assert not roles & tok.marker_ids
    if name == "gemma":
        assert ids["<image_soft_token>"] in tok.marker_ids
