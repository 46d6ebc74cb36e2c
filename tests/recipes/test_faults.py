"""Kills at any moment lose nothing: the short version of scripts/fault_test.py, which kills each
recipe family 20 times. Here KD is killed inside checkpoint writes and during validation, and the
cache writer inside shard writes, resumed after each, and each ends bitwise equal to the
uninterrupted run with no temporary folder or file left behind."""

import importlib.util

import pytest

from tests.cli_utils import REPO

spec = importlib.util.spec_from_file_location("fault_test", REPO / "scripts" / "fault_test.py")
fault_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fault_test)


@pytest.mark.parametrize("name, kills", [("kd", 3), ("cache", 2)])
def test_killed_runs_resume_to_the_uninterrupted_result(world, tmp_path, name, kills):
    family = fault_test.families(world, tmp_path)[name]
    result = fault_test.test_family(name, family, tmp_path, kills=kills, seed=0)
    assert result["point_kills"] == min(kills, len(family.points)), result  # each armed point did stop the run
    assert result["kills"] >= result["point_kills"]  # a random moment may come after a resumed run has ended
    assert result["equal"] and not result["leftovers"], result
