"""Judging a kernel change before/after (CPU): each build's runs combined per cell, the before
build added to the after result as a peer, the cases below the tolerance named."""

from __future__ import annotations

from bench.before_after import merge, table
from bench.best_of_runs import combine

from .test_bench_best_of_runs import run


def test_before_build_becomes_a_peer_and_regressions_are_named():
    before = combine([run(2.0, 1.9, 3.0, 2.9, commit="old1234"),
                      run(2.1, 1.9, 2.9, 2.9, commit="old1234")], spread=0.2)
    after = combine([run(2.2, 1.8, 2.8, 2.9), run(2.0, 1.8, 2.9, 2.9)], spread=0.2)
    peers_run = run(2.2, 2.05, 2.9, 3.1)  # FlashInfer timed once more in the same call
    result = merge(before, after, "old1234", [peers_run])
    a, b = result["rows"]
    assert a["ours"] == 2.2 and a["peers"]["attn_backend_old1234"] == 2.1
    assert a["peers"]["flashinfer"] == 2.05 and b["peers"]["flashinfer"] == 3.1
    assert any("attn_backend_old1234: the build before the change" in n for n in result["notes"])
    text, below = table(result, "old1234", tolerance=0.02)
    assert below == ["b"]  # 2.9 after against 3.0 before: 0.967
    assert "a | 2.100 | 2.200 | 1.048" in text and "b | 3.000 | 2.900 | 0.967 **below**" in text
