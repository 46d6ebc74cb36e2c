"""The ``kdtune`` command line."""
