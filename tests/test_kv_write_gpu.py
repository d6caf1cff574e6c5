"""The paged KV write kernel against the reference, on the GPU."""

from __future__ import annotations

import pytest
import torch

import attn_backend
from attn_backend import reference

from .helpers import LAYOUTS, make_cache

pytestmark = pytest.mark.gpu


def _case(layout, page_size, heads, dk, dv, dtype, num_tokens, slot_dtype, gen):
    num_pages = (2 * num_tokens) // page_size + 2
    cache = make_cache(layout, num_pages, page_size, heads, dk, dv, dtype, "cuda", gen)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.1] = -1  # padding rows
    key = torch.randn(num_tokens, heads, dk, generator=gen).to(dtype=dtype, device="cuda")
    value = torch.randn(num_tokens, heads, dv, generator=gen).to(dtype=dtype, device="cuda")
    return cache, slots.to(device="cuda", dtype=slot_dtype), key, value


def _expected(cache, slots, key, value):
    want = attn_backend.PagedKVCache(cache.k.clone(), cache.v.clone())
    reference.write_kv(want, slots, key, value)
    return want


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [1, 16, 64, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("heads, dk, dv", [(8, 128, 128), (1, 576, 512), (4, 12, 20)])
def test_kv_write_matches_reference(layout, page_size, dtype, slot_dtype, heads, dk, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    cache, slots, key, value = _case(layout, page_size, heads, dk, dv, dtype, 333, slot_dtype, gen)
    want = _expected(cache, slots, key, value)
    attn_backend.write_kv(cache, slots, key, value)
    torch.cuda.synchronize()
    # The cache was random before the write: untouched slots must still hold it.
    assert torch.equal(cache.k, want.k), f"seed={seed}"
    assert torch.equal(cache.v, want.v), f"seed={seed}"


def test_kv_write_replays_in_a_cuda_graph_with_new_slots(seed):
    gen = torch.Generator().manual_seed(seed)
    cache, slots, key, value = _case("vllm_nhd", 16, 8, 128, 128, torch.bfloat16, 64,
                                     torch.int64, gen)
    static_slots, static_key, static_value = slots.clone(), key.clone(), value.clone()
    attn_backend.write_kv(cache, static_slots, static_key, static_value)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn_backend.write_kv(cache, static_slots, static_key, static_value)
    for _ in range(3):
        _, new_slots, new_key, new_value = _case("vllm_nhd", 16, 8, 128, 128, torch.bfloat16, 64,
                                                 torch.int64, gen)
        static_slots.copy_(new_slots)
        static_key.copy_(new_key)
        static_value.copy_(new_value)
        want = _expected(cache, new_slots, new_key, new_value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(cache.k, want.k) and torch.equal(cache.v, want.v), f"seed={seed}"


def test_kv_write_rejects_dtype_mismatch_and_out_of_range_slots_on_gpu(seed):
    gen = torch.Generator().manual_seed(seed)
    cache, slots, key, value = _case("sglang", 16, 2, 64, 64, torch.float16, 8, torch.int64, gen)
    with pytest.raises(TypeError, match="must have the cache's dtype"):
        attn_backend.write_kv(cache, slots, key.bfloat16(), value.bfloat16())
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        attn_backend.write_kv(attn_backend.PagedKVCache(cache.k.float(), cache.v.float()), slots,
                              key.float(), value.float())
    bad = slots.clone()
    bad[0] = cache.num_slots
    with pytest.raises(ValueError, match="slots holds values"):
        attn_backend.write_kv(cache, bad, key, value)
