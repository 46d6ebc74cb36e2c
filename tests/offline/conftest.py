"""The recipes' tiny world (tokenizer, 2-layer student, 3-layer teacher, alpaca data), shared."""

from tests.recipes.conftest import world  # noqa: F401  (a pytest fixture, used by name)
