from tests.recipes.conftest import world  # noqa: F401  (the fixture is used by name)
