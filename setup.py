"""Ships the top-level `recipes/` and `configs/` folders inside the wheel as `kdtune.recipes` and
`kdtune.configs`, so `kdtune ls/cp/run` work the same from a checkout, an editable install or a wheel."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kdtune", "kdtune.*"]) + ["kdtune.recipes", "kdtune.configs"],
    package_dir={"kdtune.recipes": "recipes", "kdtune.configs": "configs"},
)
