"""Parsing of sacct's output as the real SLURM prints it (tests/test_slurm.py runs it for real)."""

import pytest

from pipeline.scheduling.watch import JobInfo, expand_job_ids, parse_sacct

pytestmark = pytest.mark.unit


def test_pending_array_ranges_expand_to_tasks() -> None:
    assert expand_job_ids("7_[0-2,5%2]") == ["7_0", "7_1", "7_2", "7_5"]
    assert expand_job_ids("7_3") == ["7_3"] and expand_job_ids("8") == ["8"]


def test_states_exit_codes_and_reasons() -> None:
    text = """\
12_0|COMPLETED|0:0|None|vm|00:00:03
12_1|FAILED|1:0|NonZeroExitCode|vm|00:00:02
12_2|CANCELLED by 0|0:15|None|vm|00:00:01
13_[0-1]|PENDING|0:0|Priority|None assigned|00:00:00
14|TIMEOUT|0:0|TimeLimit|vm|00:01:00
"""
    infos = parse_sacct(text)
    assert infos["12_1"] == JobInfo("FAILED", "1:0", "NonZeroExitCode", "vm", "00:00:02")
    assert infos["12_2"].state == "CANCELLED" and infos["12_2"].describe() == "CANCELLED, exit code 0:15"
    assert infos["13_1"].state == "PENDING" and infos["13_1"].reason == "Priority"
    assert infos["14"].describe() == "TIMEOUT"
