"""Every stage, killed with SIGKILL at a random point and run again, writes what an uninterrupted run
writes (tests/kill_resume.py; one kill per stage here, more by hand)."""

from __future__ import annotations

import pytest
from kill_resume import STAGES, main


@pytest.mark.slow
def test_every_stage_resumes_to_identical_outputs_after_a_kill(tmp_path):
    summary = main(["--kills", "1", "--seed", "1", "--work", str(tmp_path)])
    assert set(summary["stages"]) == {name for name, _, _ in STAGES}
    for name, stage in summary["stages"].items():
        assert stage["different"] == [], (name, stage)
    assert summary["identical"] == summary["kills"] == len(STAGES)
