"""The sweeps' side-extension sources (bench/variants.py, bench/sweep_*.py) are format templates
of C++: they must format (C++ braces doubled) and name the kernels they mean (CPU)."""

from __future__ import annotations

from bench import sweep_decode, sweep_prefill, variants


def test_the_ops_unit_formats_and_reads_fp8_caches_with_unit_scales():
    unit = variants.OPS_TEMPLATE.format(library="lib", declarations="", run_cases="",
                                        info_cases="")
    assert "TORCH_LIBRARY(lib, m)" in unit
    assert "std::vector<at::Tensor> kv = {k_cache, v_cache};" in unit
    assert "at::ones({1}" in unit


def test_decode_variant_units_format_for_each_cache_type():
    for kv, (_, cpp_type) in sweep_decode.KV_TYPES.items():
        for i, (stages, warps, tokens) in enumerate(sweep_decode.variant_shapes(kv)):
            unit = sweep_decode.variant_unit(i, stages, warps, tokens, cpp_type)
            assert f"DecodeShape<128, 128, {stages}, {warps}, {tokens}>" in unit
            assert cpp_type in unit


def test_prefill_variant_units_format():
    for i, (m, kv, stages, warps, wgmma) in enumerate(sweep_prefill.VARIANTS
                                                      + sweep_prefill.SHORT_VARIANTS):
        unit = sweep_prefill.variant_unit(i, m, kv, stages, warps, wgmma)
        assert f"PrefillShape<128, 128, {m}, {kv}, {stages}, {warps}," in unit


def test_the_decode_trace_width_matches_the_kernel_and_the_ops_check():
    from pathlib import Path

    header = (Path(__file__).resolve().parents[1] / "kernels/include/attn_backend/decode.cuh")
    assert f"constexpr int kTraceFields = {sweep_decode.TRACE_FIELDS};" in header.read_text()
    assert f"info.num_work_items * {sweep_decode.TRACE_FIELDS}," in variants.OPS_TEMPLATE


def test_the_trace_summary_times_the_merges_apart_from_the_epilogues():
    import numpy as np

    us = 1000  # the trace is in nanoseconds
    # entry, first tile, loop end, exit, SM, merge start (0: no merge)
    trace = np.array([[0, 5 * us, 40 * us, 42 * us, 0, 0],
                      [0, 5 * us, 41 * us, 43 * us, 1, 0],
                      [0, 6 * us, 41 * us, 50 * us, 2, 44 * us],
                      [0, 6 * us, 40 * us, 46 * us, 3, 43 * us]], dtype=np.int64)
    line = sweep_decode.trace_summary(trace, slots=4)
    assert "span    50.0 us" in line
    # epilogues: 2, 2 (no merge) and 3, 3 (up to the merge start): median 2.5
    assert "epilogue 2.50 us" in line
    assert "2 merges 4.50 us (max 6.00)" in line
    assert "the last ends 7.00 us after the last other CTA" in line
    # loop ends at 40, 41, 41, 40 us; loops 35, 36, 35, 34 us
    assert "loop ends p10/50/90/max 40.0/40.5/41.0/41.0 us" in line
    assert "loop p10/50/90/max 34.3/35.0/35.7/36.0 us" in line
    without_merges = trace.copy()
    without_merges[:, 5] = 0
    assert "merges" not in sweep_decode.trace_summary(without_merges, slots=4)


def test_mla_variant_units_format():
    from bench import sweep_mla

    for i, (m, stages, kv, ctas, in_registers, loads, chains) in enumerate(sweep_mla.VARIANTS):
        unit = sweep_mla.variant_units(sweep_mla.VARIANTS)[i]
        flag = "true" if in_registers else "false"
        assert f"MlaShape<{m}, {stages}, {kv}, {ctas}, {flag}, {loads}, {chains}>" in unit
        assert f"run_variant_{i}(" in unit and f"info_variant_{i}()" in unit


def test_mla_variant_names_are_unique_results_keys():
    from bench import sweep_mla

    names = [sweep_mla.variant_name(v) for v in range(len(sweep_mla.VARIANTS))]
    assert len(set(names)) == len(names)
    assert names[1] == "v1_" + "-".join(str(int(x)) for x in sweep_mla.VARIANTS[1])
