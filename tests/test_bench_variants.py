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
            unit = sweep_decode._VARIANT_TU.format(i=i, stages=stages, warps=warps, tokens=tokens,
                                                   kv_type=cpp_type)
            assert f"DecodeShape<128, 128, {stages}, {warps}, {tokens}>" in unit
            assert cpp_type in unit


def test_prefill_variant_units_format():
    for i, (m, kv, stages, warps, wgmma) in enumerate(sweep_prefill.VARIANTS
                                                      + sweep_prefill.SHORT_VARIANTS):
        unit = sweep_prefill._VARIANT_TU.format(i=i, m=m, kv=kv, stages=stages, warps=warps,
                                                wgmma="true" if wgmma else "false")
        assert f"PrefillShape<128, 128, {m}, {kv}, {stages}, {warps}," in unit
