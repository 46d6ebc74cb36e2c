"""The real Qwen2.5 tokenizer: ids, chat rendering against transformers, trained-token masks."""

from itertools import groupby
from pathlib import Path

import pytest

import kdtune
from kdtune.errors import KDTuneError
from kdtune.tokenization import load_tokenizer

QWEN = Path(__file__).parents[1] / "assets" / "qwen2_5_tokenizer"

CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, and explain why in a sentence?"},
        {"role": "assistant", "content": "11: only 1 and 11 divide it.\nThat's all."},
    ],
    "default_system": [
        {"role": "user", "content": "Grüße! 你好 🙂"},
        {"role": "assistant", "content": "  spaces kept  "},
    ],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason="transformers is the reference chat renderer")
    return transformers.AutoTokenizer.from_pretrained(str(QWEN))


def trained_pieces(tok, ids, mask):
    """The decoded text of each maximal run of trained tokens."""
    runs, start = [], 0
    for trained, group in groupby(mask):
        n = len(list(group))
        if trained:
            runs.append(tok.decode(ids[start : start + n]))
        start += n
    return runs


def hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_known_ids_and_special_tokens(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    assert tok.vocab_size == 151665
    assert tok.bos_id is None
    assert tok.eos_id == 151645  # <|im_end|>, from tokenizer_config.json
    assert set(tok.eos_ids) == {151645, 151643}
    assert tok.pad_id == 151643  # <|endoftext|>


@pytest.mark.parametrize(
    "text",
    ["Hello world", "  leading and trailing  ", "Grüße, 你好, مرحبا 🙂🚀", "def f(x):\n\treturn x**2  # sq\n\n", "a" * 500],
)
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_matches_transformers(tok, hf):
    for text in ["Hello world", "Grüße 🙂\n\n  x", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == hf.encode(text)
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    assert tok.decode(ids) == "<|im_start|>hello<|im_end|>"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_apply_chat_template_matches_transformers(tok, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    if add_generation_prompt:
        messages = messages[:-1]
    assert tok.apply_chat_template(messages, add_generation_prompt) == hf_ids(hf, messages, add_generation_prompt)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_is_exactly_replies_and_end_of_turn(tok, hf, name):
    messages = CONVERSATIONS[name]
    ids, mask = tok.tokenize_messages(messages)
    assert ids == hf_ids(hf, messages, False)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert trained_pieces(tok, ids, mask) == replies


def test_train_on_last_and_on_input(tok):
    messages = CONVERSATIONS["system_multi_turn"]
    ids, mask = tok.tokenize_messages(messages, train_on="last")
    assert trained_pieces(tok, ids, mask) == [messages[-1]["content"] + "<|im_end|>"]
    _, mask = tok.tokenize_messages(messages, train_on_input=True)
    assert all(mask)
    with pytest.raises(KDTuneError, match="train_on"):
        tok.tokenize_messages(messages, train_on="first")


def test_truncation_keeps_end_of_turn(tok):
    messages = CONVERSATIONS["system_multi_turn"]
    full, full_mask = tok.tokenize_messages(messages)
    ids, mask = tok.tokenize_messages(messages, max_seq_len=len(full) - 6)
    assert len(ids) == len(full) - 6
    assert ids[:-1] == full[: len(ids) - 1] and ids[-1] == tok.encode("<|im_end|>")[0]
    assert mask == full_mask[: len(ids)]
    assert load_tokenizer(QWEN, max_seq_len=20).tokenize_messages(messages)[0][-1] == ids[-1]


def test_template_errors_are_user_errors(tok, tmp_path):
    with pytest.raises(KDTuneError, match="rejected the conversation"):
        tok.apply_chat_template([])  # the Qwen template reads messages[0]
    unstable = "{% for m in messages %}{{ m.content }}{% if loop.last and m.role == 'assistant' %}!{% endif %}<|im_end|>{% endfor %}"
    unstable_tok = load_tokenizer(QWEN, chat_template=unstable)
    two_turns = CONVERSATIONS["default_system"] * 2
    with pytest.raises(KDTuneError, match="renders a conversation's beginning differently"):
        unstable_tok.tokenize_messages(two_turns)
    ids, mask = unstable_tok.tokenize_messages(two_turns, train_on="last")  # the last reply is still exact
    assert trained_pieces(unstable_tok, ids, mask) == ["  spaces kept  !<|im_end|>"]
    with pytest.raises(KDTuneError, match="line 1"):
        load_tokenizer(QWEN, chat_template="{% if %}")
    with pytest.raises(KDTuneError, match="no such file"):
        load_tokenizer(QWEN, chat_template=str(tmp_path / "missing.jinja"))


def test_template_file_globals_and_generation_tag(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{{ strftime_now('%Y')[:0] }}{% for m in messages %}"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|endoftext|>{% endgeneration %}"
        "{% else %}{{ {'q': m.content} | tojson }}\n{% endif %}{% endfor %}"
    )
    tok = load_tokenizer(QWEN, chat_template=str(template))
    messages = [{"role": "user", "content": "ü?"}, {"role": "assistant", "content": "ja"}]
    assert tok.render_chat(messages) == '{"q": "ü?"}\nja<|endoftext|>'
    ids, mask = tok.tokenize_messages(messages)
    assert trained_pieces(tok, ids, mask) == ["ja<|endoftext|>"]


def test_no_template_and_no_tokenizer_are_user_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((QWEN / "tokenizer.json").read_bytes())
    bare = load_tokenizer(tmp_path)
    assert bare.encode("Hello world") == [9707, 1879]
    with pytest.raises(KDTuneError, match="no chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(KDTuneError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_fingerprint_save_and_lazy_entry_point(tok, tmp_path):
    tok.save(tmp_path / "out")
    again = kdtune.load_tokenizer(tmp_path / "out")
    assert again.vocab_fingerprint == tok.vocab_fingerprint
    assert again.apply_chat_template(CONVERSATIONS["default_system"]) == tok.apply_chat_template(
        CONVERSATIONS["default_system"]
    )
