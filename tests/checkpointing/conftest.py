import pytest

import kdtune


def assert_same_tokenizer(folder, reference, texts) -> None:
    """The tokenizers of two checkpoint folders give the same ids for ``texts`` and render a chat alike."""
    ours, theirs = kdtune.load_tokenizer(folder), kdtune.load_tokenizer(reference)
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == \
        theirs.apply_chat_template(chat, add_generation_prompt=True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer with a ChatML template (400 ids)."""
    from kdtune.tokenization.build import train_chatml_tokenizer

    texts = [f"What is {i} + {i * 3}? It is {i * 4}. Hello world, how are you today?" for i in range(200)]
    return train_chatml_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)
