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
