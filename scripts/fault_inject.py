"""Run a recipe with one kill point armed, for scripts/fault_test.py.

    KDTUNE_FAULT=POINT:N python scripts/fault_inject.py RECIPE.py --config CONFIG [overrides]

runs the recipe as `kdtune run` does (its folder importable, ``sys.argv`` its own) and kills its own
process with SIGKILL the Nth time it reaches POINT (on rank 0 under torchrun):

- ``checkpoint``: a checkpoint's weights are in its temporary folder, which is not yet renamed;
- ``shard``: a teacher-cache shard is in its temporary file, which is not yet renamed;
- ``validation``: validation is about to take its next batch;
- ``generation``: the on-policy sampler is about to generate a step's completions.

Without KDTUNE_FAULT it just runs the recipe, so the reference and the resumed runs take the same path.
"""

import os
import runpy
import signal
import sys
from pathlib import Path


def arm(point: str, nth: int) -> None:
    hits = 0

    def hit():
        nonlocal hits
        hits += 1
        if hits == nth and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)

    def kill_around(module, name: str, *, before: bool) -> None:
        """Replace ``module.name`` by a call that counts a hit before (or after) the original."""
        original = getattr(module, name)

        def armed(*args, **kwargs):
            if before:
                hit()
            out = original(*args, **kwargs)
            if not before:
                hit()
            return out

        setattr(module, name, armed)

    if point == "checkpoint":  # the weights are written into the temporary folder, not yet renamed
        from kdtune.checkpointing import hf_checkpointer

        kill_around(hf_checkpointer, "write_weights", before=False)
    elif point == "shard":  # the shard is written to its temporary file, not yet renamed
        from kdtune.offline import shards

        kill_around(shards, "save_file", before=False)
    elif point == "validation":
        from kdtune import training

        build_validation = training.build_validation

        class Batches(list):
            def __iter__(self):
                for batch in list.__iter__(self):
                    hit()
                    yield batch

        def validation_that_kills(*args, **kwargs):
            batches = build_validation(*args, **kwargs)
            return None if batches is None else Batches(batches)

        training.build_validation = validation_that_kills
    elif point == "generation":
        from kdtune.training import on_policy

        kill_around(on_policy, "generate", before=True)
    else:
        raise SystemExit(f"fault_inject: unknown point '{point}'")


def main() -> None:
    point, _, nth = os.environ.get("KDTUNE_FAULT", "").partition(":")
    if point:
        arm(point, int(nth))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
