"""The compiled extension: the stamp logic, loading, and tracing through the fake kernels."""

from __future__ import annotations

import json

import pytest
import torch

from attn_backend import _extension, _sources


def test_sources_hash_tracks_kernel_changes(tmp_path):
    root = tmp_path / "kernels"
    (root / "csrc").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "csrc" / "a.cu").write_text("// one")
    first = _sources.sources_hash(root)
    (root / "include" / "b.cuh").write_text("// header")
    second = _sources.sources_hash(root)
    (root / "include" / "b.cuh").write_text("// header changed")
    assert len({first, second, _sources.sources_hash(root)}) == 3
    assert [p.name for p in _sources.compiled_sources(root)] == ["a.cu"]


def test_stale_or_foreign_prebuilt_builds_are_refused():
    good = {"torch_version": torch.__version__, "source_hash": "h", "arch_list": "8.0;9.0a"}
    assert _extension._stamp_matches(good, "h")[0] or torch.cuda.is_available()
    ok, why = _extension._stamp_matches({**good, "torch_version": "0.0.1"}, "h")
    assert not ok and "0.0.1" in why
    ok, why = _extension._stamp_matches(good, "other")
    assert not ok and "sources changed" in why


def _prebuilt_stamp():
    stamp = _extension._PACKAGE_DIR / _extension.BUILD_STAMP
    return json.loads(stamp.read_text()) if stamp.exists() else None


needs_prebuilt = pytest.mark.skipif(
    _extension._prebuilt_library(_sources.sources_hash()) is None,
    reason="no setup.py build matching this torch and these sources (pip install -e . builds one)")


@needs_prebuilt
def test_prebuilt_extension_loads_and_registers_ops():
    ops = _extension.load_ops()
    assert _extension.loaded_library().endswith(_prebuilt_stamp()["library"])
    schema = str(ops.paged_kv_write.default._schema)
    assert "Tensor(a!) k_cache" in schema and "Tensor(b!) v_cache" in schema


@needs_prebuilt
def test_kv_write_op_traces_with_fake_tensors():
    """torch.compile-style tracing runs the Meta kernel, so no GPU is needed."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ops = _extension.load_ops()

    def step(key, value, k_cache, v_cache, slots):
        ops.paged_kv_write(key, value, k_cache, v_cache, slots)
        return k_cache.sum()

    args = (torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(4, 16, 2, 8),
            torch.randn(4, 16, 2, 8), torch.tensor([0, 5, -1]))
    graph = make_fx(step, tracing_mode="fake")(*args)
    assert "attn_backend.paged_kv_write" in graph.code


@needs_prebuilt
def test_every_served_head_dim_has_its_kernel_configurations():
    """The head dims the wrappers accept on CUDA (_validation.SUPPORTED_HEAD_DIMS) are exactly
    those with a decode and the three prefill roles compiled, plus MLA's with its two prefill
    shapes; tile facts are the kernels'."""
    from attn_backend._validation import MLA_HEAD_DIMS, MLA_MHA_HEAD_DIMS, SUPPORTED_HEAD_DIMS
    from attn_backend.kernel_configs import all_configs, find

    for qk, vo in SUPPORTED_HEAD_DIMS:
        for name in ("decode", "prefill_mma", "prefill_short"):
            assert find(name, qk, vo) is not None, (name, qk, vo)
    keysplit = find("prefill_short_keysplit", 128, 128)
    assert (keysplit.family, keysplit.tile_rows, keysplit.kv_tile_tokens) == ("prefill", 16, 64)
    assert [c.head_dim_qk for c in all_configs() if c.name == "prefill_short_keysplit"] == [128]
    assert {(c.head_dim_qk, c.head_dim_vo) for c in all_configs()} == \
        set(SUPPORTED_HEAD_DIMS) | {MLA_HEAD_DIMS, MLA_MHA_HEAD_DIMS}
    assert {c.name for c in all_configs() if (c.head_dim_qk, c.head_dim_vo) == MLA_MHA_HEAD_DIMS} \
        == {"prefill_mma", "prefill_wgmma", "prefill_short"}
    mla, wide = find("prefill_mla", *MLA_HEAD_DIMS), find("prefill_mla_wide", *MLA_HEAD_DIMS)
    mla_wgmma = find("prefill_mla_wgmma", *MLA_HEAD_DIMS)
    assert (mla.family, mla.tile_rows, wide.tile_rows) == ("prefill", 16, 32)
    assert (mla_wgmma.family, mla_wgmma.tile_rows, mla_wgmma.kv_tile_tokens, mla_wgmma.wgmma) \
        == ("prefill", 64, 32, True)
    assert mla_wgmma.smem_bytes <= 227 * 1024
    seesaw = find("prefill_mla_seesaw", *MLA_HEAD_DIMS)
    assert (seesaw.family, seesaw.tile_rows, seesaw.kv_tile_tokens, seesaw.threads,
            seesaw.wgmma) == ("prefill", 64, 64, 256, True)
    assert seesaw.smem_bytes <= 227 * 1024
    assert {c.name for c in all_configs() if (c.head_dim_qk, c.head_dim_vo) == MLA_HEAD_DIMS} \
        == {"prefill_mla", "prefill_mla_wide", "prefill_mla_wgmma", "prefill_mla_seesaw"}
    for config in all_configs():
        assert config.kv_tile_tokens % 16 == 0 and config.kv_tile_tokens <= config.threads
        assert config.tile_rows % 16 == 0 and config.smem_bytes > 0
    assert find("decode", 128, 128).kv_tile_tokens == 64
    assert find("decode_full_batch", 128, 128).kv_tile_tokens == 48


@needs_prebuilt
def test_mla_backends_plan_for_their_kernels_and_the_cpu_plans_mma_for_auto():
    from attn_backend import PagedPrefill

    def planned(backend, heads, q_len):
        mla = PagedPrefill(num_qo_heads=heads, num_kv_heads=1, head_dim=576, head_dim_vo=512,
                           dtype=torch.bfloat16, device="cpu", max_batch_size=4,
                           max_num_tokens=64, backend=backend)
        mla.plan([0, q_len, 2 * q_len], [100, 3000])
        return mla._planned.config.name, mla._planned.tile_rows

    assert planned("wgmma", 16, 1) == ("prefill_mla_wgmma", 64)
    assert planned("wgmma", 128, 2) == ("prefill_mla_wgmma", 64)
    assert planned("seesaw", 16, 1) == ("prefill_mla_seesaw", 64)
    assert planned("seesaw", 128, 2) == ("prefill_mla_seesaw", 64)
    assert planned("mma", 16, 1) == ("prefill_mla", 16)
    assert planned("mma", 16, 4) == ("prefill_mla_wide", 32)
    assert planned("auto", 16, 1) == ("prefill_mla", 16)  # wgmma only where an sm_90 GPU runs it


@needs_prebuilt
def test_mla_auto_plans_three_tiers_by_rows_per_request_where_wgmma_runs(monkeypatch):
    """Where the warpgroup kernels run (stood in for on the CPU), the plan takes the 16-row
    mma.sync tiles up to 16 rows per request, the 32-key wgmma ones up to 64, the seesaw ones
    above; FP8 caches keep the 32-key kernel above 16 rows."""
    from attn_backend import PagedPrefill

    monkeypatch.setattr(PagedPrefill, "_wgmma_or_mma", lambda self, wgmma, mma, backend:
                        self._find_config(mma if backend == "mma" else wgmma))

    def planned(heads, q_len, kv_dtype=torch.bfloat16):
        mla = PagedPrefill(num_qo_heads=heads, num_kv_heads=1, head_dim=576, head_dim_vo=512,
                           dtype=torch.bfloat16, kv_dtype=kv_dtype, device="cpu",
                           max_batch_size=4, max_num_tokens=64)
        mla.plan([0, q_len, 2 * q_len], [100, 3000])
        return mla._planned.config.name

    assert planned(16, 1) == "prefill_mla"
    assert planned(16, 4) == "prefill_mla_wgmma"
    assert planned(16, 8) == "prefill_mla_seesaw"
    assert planned(128, 1) == "prefill_mla_seesaw"
    assert planned(128, 1, torch.float8_e4m3fn) == "prefill_mla_wgmma"


@needs_prebuilt
def test_the_run_op_takes_at_most_14_arguments_and_traces_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    ops = _extension.load_ops()
    assert len(ops.attention.default._schema.arguments) <= 14

    def step(q, k, v, table, workspace, out, *scales):
        ops.attention(q, [k, v, *scales], table, None, None, False, workspace, [0] * 40, None,
                      0.1, 0.0, out, None)
        return out.sum()

    args = (torch.randn(3, 8, 64), torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64),
            torch.zeros(3, 4, dtype=torch.int32), torch.zeros(64, dtype=torch.uint8),
            torch.empty(3, 8, 64))
    graph = make_fx(step, tracing_mode="fake")(*args)
    assert "attn_backend.attention" in graph.code
    # An FP8 cache comes with its K and V scales in the same list.
    fp8_args = (args[0], args[1].to(torch.float8_e4m3fn), args[2].to(torch.float8_e4m3fn),
                *args[3:], torch.ones(1), torch.ones(2))
    graph = make_fx(step, tracing_mode="fake")(*fp8_args)
    assert "attn_backend.attention" in graph.code
