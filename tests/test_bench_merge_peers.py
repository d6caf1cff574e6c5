"""A second FlashInfer release beside the first (CPU): its peers renamed with their label, and
merged case by case into the main run's result."""

from __future__ import annotations

import pytest

from bench.common import label_flashinfer_peers
from bench.merge_peers import merge_peers


def result(rows, notes=(), benchmark="decode"):
    return {"benchmark": benchmark, "rows": rows, "notes": list(notes)}


def test_flashinfer_peers_take_the_label_and_the_others_keep_their_names():
    rows = [{"case": "a", "ours": 1.0, "peers": {"flashinfer": 0.9, "flashinfer_fa3": 1.1,
                                                 "sdpa_cudnn_contiguous": 0.8}}]
    assert label_flashinfer_peers(rows, "0.7.4")[0]["peers"] == {
        "flashinfer_0.7.4": 0.9, "flashinfer_fa3_0.7.4": 1.1, "sdpa_cudnn_contiguous": 0.8}
    assert rows[0]["peers"]["flashinfer"] == 0.9  # the input is left as it was


def test_extra_peers_join_the_main_rows_and_ours_stays_the_main_runs():
    main = result([{"case": "a", "ours": 2.0, "peers": {"flashinfer": 1.9}},
                   {"case": "b", "ours": 3.0, "peers": {}}], notes=["flashinfer 0.6.15.post1"])
    extra = result([{"case": "a", "ours": 2.5, "peers": {"flashinfer_0.7.4": 1.95}},
                    {"case": "c", "ours": 1.0, "peers": {"flashinfer_0.7.4": 1.0}}],
                   notes=["flashinfer 0.7.4"])
    merged = merge_peers(main, [extra])
    a, b = merged["rows"]
    assert a == {"case": "a", "ours": 2.0, "peers": {"flashinfer": 1.9, "flashinfer_0.7.4": 1.95}}
    assert b["peers"] == {} and len(merged["rows"]) == 2
    assert merged["notes"] == ["flashinfer 0.6.15.post1", "flashinfer 0.7.4"]


def test_runs_of_another_benchmark_are_refused():
    with pytest.raises(ValueError, match="cannot merge prefill peers into decode"):
        merge_peers(result([]), [result([], benchmark="prefill")])
