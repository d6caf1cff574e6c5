"""bench/bench_mla.py on the CPU: case names as the results format wants them, the flop count,
and the plot over a result's rows (the timings themselves need a GPU)."""

from __future__ import annotations

import torch

from bench import bench_mla


def test_case_names_follow_the_results_format():
    assert bench_mla.case_name(64, 4096, 16, 64) == "b64_kv4096_h16_mla512-64_bf16_p64"
    assert bench_mla.case_name(16, 4096, 128, 1, q_len=4) == "b16_kv4096_h128_mla512-64_bf16_p1_q4"
    assert bench_mla.case_name(64, 4096, 16, 64, kv_dtype=torch.float8_e4m3fn) == \
        "b64_kv4096_h16_mla512-64_fp8e4m3_p64"


def test_flops_count_the_causal_pairs():
    # one query token sees every key; four drafts on 10 keys see 7, 8, 9 and 10
    assert bench_mla.flops(2, 10, 16, 1) == 2 * 1088 * 16 * 2 * 10
    assert bench_mla.flops(1, 10, 1, 4) == 2 * 1088 * (7 + 8 + 9 + 10)
    assert bench_mla.latent_bytes(3, 100) == 3 * 100 * 576 * 2
    assert bench_mla.latent_bytes(3, 100, torch.float8_e4m3fn) == 3 * 100 * 576


def test_plot_draws_every_panel(tmp_path):
    rows = []
    for heads in bench_mla.HEADS:
        for batch in bench_mla.BATCHES:
            for kv_len in bench_mla.KV_LENS:
                for page in bench_mla.PAGE_SIZES:
                    rows.append({"case": bench_mla.case_name(batch, kv_len, heads, page),
                                 "ours": 1.0 + kv_len / 1e5, "peers": {"flashmla": 0.9}})
                    rows.append({"case": bench_mla.case_name(batch, kv_len, heads, page,
                                                             kv_dtype=torch.float8_e4m3fn),
                                 "ours": 2.0, "peers": {}})  # not drawn: bf16 panels
    path = tmp_path / "mla.png"
    bench_mla.plot(rows, 4.2, path, device="test")
    assert path.stat().st_size > 10_000


def test_summary_table_shows_our_other_kernels_beside_the_peers():
    from bench.common import format_table

    rows = [{"case": "a", "ours": 1.0, "ours_us": 5.0, "ours_mma": 0.5,
             "peers": {"flashmla": 2.0}},
            {"case": "b", "ours": 3.0, "ours_us": 7.0, "peers": {}}]
    lines = format_table(rows, "TB/s").splitlines()
    assert lines[1] == "case | ours | ours_mma | flashmla"
    assert lines[3] == "a | 1.000 | 0.500 | 2.000"
    assert lines[4] == "b | 3.000 | - | -"
