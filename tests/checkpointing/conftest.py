import pytest


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer with a ChatML template (400 ids)."""
    from kdtune.tokenization.build import train_chatml_tokenizer

    texts = [f"What is {i} + {i * 3}? It is {i * 4}. Hello world, how are you today?" for i in range(200)]
    return train_chatml_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)
