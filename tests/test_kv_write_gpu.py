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
    with pytest.raises(TypeError, match=r"must share a dtype, the cache's \(torch.float16\)"):
        attn_backend.write_kv(cache, slots, key.bfloat16(), value.bfloat16())
    with pytest.raises(TypeError, match="key .* and value .* must share a dtype"):
        attn_backend.write_kv(cache, slots, key, value.bfloat16())
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        attn_backend.write_kv(attn_backend.PagedKVCache(cache.k.float(), cache.v.float()), slots,
                              key.float(), value.float())
    bad = slots.clone()
    bad[0] = cache.num_slots
    with pytest.raises(ValueError, match="slots holds values"):
        attn_backend.write_kv(cache, bad, key, value)


def _fp8_case(layout, page_size, heads, dk, dv, in_dtype, fp8_dtype, scale_kind, gen):
    num_tokens = 257
    num_pages = (2 * num_tokens) // page_size + 2
    cache = make_cache(layout, num_pages, page_size, heads, dk, dv, fp8_dtype, "cuda", gen)
    if scale_kind == "per_head":
        k_scale, v_scale = (torch.rand(2, heads, generator=gen) * 3 + 0.01).cuda()
    elif scale_kind == "tensor":
        k_scale, v_scale = torch.tensor(0.37, device="cuda"), torch.tensor(2.5, device="cuda")
    else:
        k_scale, v_scale = 0.05, None
    cache = attn_backend.PagedKVCache(cache.k, cache.v, k_scale, v_scale)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.1] = -1  # padding rows
    # Large values too: beyond the format's range they saturate.
    key = (torch.randn(num_tokens, heads, dk, generator=gen) * 40).to(in_dtype).cuda()
    value = (torch.randn(num_tokens, heads, dv, generator=gen) * 3000).to(in_dtype).cuda()
    return cache, slots.cuda(), key, value


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_kind", ["float", "tensor", "per_head"])
@pytest.mark.parametrize("via_input_dtype", [False, True], ids=["vllm", "sglang"])
def test_fp8_kv_write_is_byte_exact(layout, fp8_dtype, in_dtype, scale_kind, via_input_dtype,
                                    seed):
    """The quantising write stores the bytes of the reference rule (x / scale in float32,
    nearest even, saturated; SGLang's through the input dtype), skips padding, leaves the
    rest of the cache and the caller's rows as they were."""
    gen = torch.Generator().manual_seed(seed)
    for page_size, heads, dk, dv in ((16, 8, 128, 128), (1, 2, 64, 64), (5, 4, 24, 40)):
        cache, slots, key, value = _fp8_case(layout, page_size, heads, dk, dv, in_dtype,
                                             fp8_dtype, scale_kind, gen)
        key_before, value_before = key.clone(), value.clone()
        want = attn_backend.PagedKVCache(cache.k.clone(), cache.v.clone(), cache.k_scale,
                                         cache.v_scale)
        reference.write_kv(want, slots, key, value, via_input_dtype=via_input_dtype)
        attn_backend.write_kv(cache, slots, key, value, via_input_dtype=via_input_dtype)
        torch.cuda.synchronize()
        assert torch.equal(cache.k.view(torch.uint8), want.k.view(torch.uint8)), f"seed={seed}"
        assert torch.equal(cache.v.view(torch.uint8), want.v.view(torch.uint8)), f"seed={seed}"
        assert torch.equal(key, key_before) and torch.equal(value, value_before)


def test_fp8_kv_write_unaligned_rows_and_nan(seed):
    """Rows that do not start on a vector boundary take the one-element path; NaN stays NaN."""
    gen = torch.Generator().manual_seed(seed)
    cache, slots, key, value = _fp8_case("sglang", 16, 4, 64, 64, torch.bfloat16,
                                         torch.float8_e4m3fn, "per_head", gen)
    wide = torch.randn(key.shape[0], 4, 65, generator=gen).to(torch.bfloat16).cuda()
    key = wide[:, :, 1:]  # starts 2 bytes into a row
    token = int((slots >= 0).nonzero()[0])  # a token that is written (slots are distinct)
    key[token, 0, 3] = float("nan")
    want = attn_backend.PagedKVCache(cache.k.clone(), cache.v.clone(), cache.k_scale, cache.v_scale)
    reference.write_kv(want, slots, key, value)
    attn_backend.write_kv(cache, slots, key, value)
    torch.cuda.synchronize()
    got_k = cache.k.view(torch.uint8).clone()
    want_k = want.k.view(torch.uint8).clone()
    page, offset = divmod(int(slots[token]), 16)
    assert torch.isnan(cache.k[page, offset, 0, 3].float())
    got_k[page, offset, 0, 3] = want_k[page, offset, 0, 3] = 0  # NaN's sign bit is not specified
    assert torch.equal(got_k, want_k), f"seed={seed}"
    assert torch.equal(cache.v.view(torch.uint8), want.v.view(torch.uint8)), f"seed={seed}"
