"""The recipe tests' tiny world (tokenizer, 2-layer student, 3-layer teacher, alpaca data)."""

from tests.recipes.conftest import world  # noqa: F401  (the fixture is used by name)
