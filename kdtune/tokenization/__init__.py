"""Tokenizers and chat templates: ``tokenizer.json`` via `tokenizers`, the model's own template via jinja2."""

from kdtune.tokenization.chat_template import ChatTemplate
from kdtune.tokenization.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ChatTemplate", "Tokenizer", "load_tokenizer"]
