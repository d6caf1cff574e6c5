"""Combining complete benchmark runs (CPU): each cell is its best run, and the notes say where
the runs disagreed."""

from __future__ import annotations

import pytest

from bench.best_of_runs import combine


def run(ours_a, fi_a, ours_b, fi_b, *, commit="abc1234", ceiling=3.0):
    return {"benchmark": "decode", "git_commit": commit, "device": "GPU", "unit": "TB/s",
            "command": "bash scripts/gpu_check.sh --only decode",
            "ceiling": {"name": "copy", "unit": "TB/s", "value": ceiling},
            "rows": [{"case": "a", "ours": ours_a, "ours_us": 1 / ours_a,
                      "peers": {"flashinfer": fi_a}},
                     {"case": "b", "ours": ours_b, "ours_us": 1 / ours_b,
                      "peers": {"flashinfer": fi_b}}],
            "notes": ["peer x skipped"]}


def test_each_cell_is_its_best_run_and_slow_cells_are_listed():
    result = combine([run(2.0, 0.3, 3.0, 2.9), run(0.2, 2.1, 2.95, 3.0, ceiling=3.1)], spread=0.2)
    a, b = result["rows"]
    assert (a["ours"], a["peers"]["flashinfer"], a["ours_us"]) == (2.0, 2.1, 0.5)
    assert (b["ours"], b["peers"]["flashinfer"]) == (3.0, 3.0)
    assert result["ceiling"]["value"] == 3.1
    assert result["notes"][0] == "peer x skipped"
    listed = result["notes"][-1]
    assert "a ours: 2.000 / 0.200" in listed and "a flashinfer: 0.300 / 2.100" in listed
    assert "b ours" not in listed and "b flashinfer" not in listed


def test_runs_of_different_commits_do_not_combine():
    with pytest.raises(ValueError, match="git_commit"):
        combine([run(1, 1, 1, 1), run(1, 1, 1, 1, commit="def5678")], spread=0.2)
