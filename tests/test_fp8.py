"""FP8 KV-cache semantics (attn_backend.fp8): formats, scales, the write rule both engines'
writers follow, the reference's reads, and what is refused."""

from __future__ import annotations

import pytest
import torch

import attn_backend
from attn_backend import PagedDecode, PagedKVCache, PageTable, fp8, reference

from .helpers import allocate_pages

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype, largest", [(E4M3, 448.0), (E5M2, 57344.0)])
def test_quantize_saturates_and_keeps_nan(dtype, largest):
    x = torch.tensor([[1e9, -1e9, float("nan"), 0.0, -0.0, largest]]).view(1, 1, 6)
    q = fp8.quantize(x, torch.ones(1), dtype)
    assert q.dtype == dtype
    got = q.float()[0, 0]
    assert got[0] == largest and got[1] == -largest
    assert torch.isnan(got[2]) and got[3] == 0 and got[5] == largest


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_rounds_to_nearest_even(dtype, seed):
    """Each representable value's neighbours: the midpoint between two goes to the one whose
    last mantissa bit is 0 (the codes are ordered for positive values)."""
    codes = torch.arange(1, 0x7E if dtype == E4M3 else 0x7B, dtype=torch.uint8)
    values = codes.view(dtype).float()
    midpoints = (values[:-1] + values[1:]) / 2
    got = _bytes(fp8.quantize(midpoints.view(-1, 1, 1), torch.ones(1), dtype)).flatten()
    low, high = codes[:-1], codes[1:]
    want = torch.where(low % 2 == 0, low, high)
    assert torch.equal(got, want)
    x = torch.randn(1000, 1, 1, generator=torch.Generator().manual_seed(seed)) * 50
    nearest = fp8.quantize(x, torch.ones(1), dtype).float()
    below = (values[None, :] - x.reshape(-1, 1).abs()).abs().min(dim=1).values
    assert torch.all((nearest.abs().flatten() - x.abs().flatten()).abs() <= below + 1e-6)


def test_e4m3_and_e5m2_bytes_differ_and_are_read_by_their_string():
    """vLLM#54341: bytes written as one format and read as the other are wrong; the strings
    pick the view."""
    x = torch.linspace(-3, 3, 64).view(4, 2, 8)
    storage = _bytes(fp8.quantize(x, torch.ones(2), E4M3)).clone()
    assert not torch.equal(storage, _bytes(fp8.quantize(x, torch.ones(2), E5M2)))
    as_e4m3 = fp8.view_as_fp8(storage, "fp8").float()
    assert torch.allclose(as_e4m3, x, atol=0.13)  # e4m3 steps are 0.25 near 3
    assert fp8.view_as_fp8(storage, "fp8_e4m3").dtype == E4M3
    assert fp8.view_as_fp8(storage, "fp8_e5m2").dtype == E5M2


def test_writes_match_both_engines_writers(seed):
    """SGLang's pool store: `cache_k.div_(layer.k_scale)` on the bf16/fp16 tensor, then
    `.to(fp8)` (same bytes for every in-range value); vLLM's reshape_and_cache_flash:
    cvt(x / scale, SATFINITE) in float = clamp, then nearest even. The two differ."""
    gen = torch.Generator().manual_seed(seed)
    differ = 0
    for input_dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(64, 4, 32, generator=gen) * 3).to(input_dtype)
        for dtype in (E4M3, E5M2):
            largest = torch.finfo(dtype).max
            for scale in (1.0, 0.037, 2.5, 0.0011):
                heads = torch.full((4,), scale)
                sglang_ours = _bytes(fp8.quantize(x, heads, dtype, via_input_dtype=True))
                sglang = _bytes(x.clone().div_(torch.tensor(scale)).to(dtype))
                in_range = (x.float() / scale).abs() <= largest
                assert torch.equal(sglang_ours[in_range], sglang[in_range])
                vllm_ours = _bytes(fp8.quantize(x, heads, dtype))
                vllm = _bytes((x.float() / scale).clamp(-largest, largest).to(dtype))
                assert torch.equal(vllm_ours, vllm)
                differ += int((vllm_ours != sglang_ours).sum())
    assert differ > 0  # the double rounding shows on random data


def test_per_head_scales_divide_each_head(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 3, 16, generator=gen)
    scales = torch.tensor([0.5, 2.0, 0.01])
    q = fp8.quantize(x, scales, E4M3)
    for h in range(3):
        assert torch.equal(_bytes(q[:, h]), _bytes(fp8.quantize(x[:, h:h + 1], scales[h:h + 1],
                                                                E4M3)[:, 0]))
    assert torch.allclose(fp8.dequantize(q, scales), x, rtol=0.07, atol=0.02 * 0.5)


def _fp8_cache(dtype, k_scale, v_scale, gen, num_pages=12, page_size=16, heads=2, dim=64):
    k = torch.randn(num_pages * page_size, heads, dim, generator=gen)
    v = torch.randn(num_pages * page_size, heads, dim, generator=gen)
    scales = (fp8.scale_per_head("k_scale", k_scale, heads, "cpu"),
              fp8.scale_per_head("v_scale", v_scale, heads, "cpu"))
    return PagedKVCache.from_sglang(fp8.quantize(k, scales[0], dtype),
                                    fp8.quantize(v, scales[1], dtype), page_size,
                                    k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("scales", [(None, None), (0.05, 0.02), "per_head"])
def test_reference_reads_fp8_as_its_dequantised_values(dtype, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    if scales == "per_head":
        scales = (torch.tensor([0.03, 0.3]), torch.tensor(0.04))
    cache = _fp8_cache(dtype, *scales, gen)
    k_heads, v_heads = cache.scales_per_head()
    dequantised = PagedKVCache(fp8.dequantize(cache.k, k_heads), fp8.dequantize(cache.v, v_heads))
    pages, _ = allocate_pages([40, 7], 16, gen, spare_pages=12 - 4)
    slots = torch.cat([torch.tensor(p)[torch.arange(n) // 16] * 16 + torch.arange(n) % 16
                       for p, n in zip(pages, [40, 7])])
    q = torch.randn(2, 8, 64, generator=gen)
    args = ([0, 1, 2], [0, 40, 47], slots)
    got = reference.attention(q, args[0], cache, args[1], args[2])
    want = reference.attention(q, args[0], dequantised, args[1], args[2])
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_cpu_decode_over_an_fp8_cache_is_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = _fp8_cache(E4M3, 0.05, torch.tensor([0.02, 0.03]), gen)
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                         kv_dtype=E4M3, device="cpu", max_batch_size=2)
    decode.plan([40, 7])
    table = PageTable(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32))
    q = torch.randn(2, 8, 64, generator=gen).bfloat16()
    out, lse = decode.run(q, cache, table, return_lse=True)
    kv_indptr, kv_slots = table.token_slots(2, [40, 7], 16)
    want = reference.attention(q, [0, 1, 2], cache, kv_indptr, kv_slots)
    torch.testing.assert_close(out.float(), want.out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, want.lse)


def test_write_kv_quantises_without_touching_the_callers_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = _fp8_cache(E5M2, 0.5, torch.tensor([0.25, 4.0]), gen)
    key = torch.randn(3, 2, 64, generator=gen).bfloat16()
    value = torch.randn(3, 2, 64, generator=gen).bfloat16()
    key_before, value_before = key.clone(), value.clone()
    slots = torch.tensor([5, -1, 77])
    attn_backend.write_kv(cache, slots, key, value)
    assert torch.equal(key, key_before) and torch.equal(value, value_before)
    k_heads, v_heads = cache.scales_per_head()
    got_k, got_v = cache.gather(torch.tensor([5, 77]))
    assert torch.equal(_bytes(got_k), _bytes(fp8.quantize(key[[0, 2]], k_heads, E5M2)))
    assert torch.equal(_bytes(got_v), _bytes(fp8.quantize(value[[0, 2]], v_heads, E5M2)))
    attn_backend.write_kv(cache, slots, key, value, via_input_dtype=True)  # SGLang's rounding
    got_k, _ = cache.gather(torch.tensor([5, 77]))
    sglang = key[[0, 2]].clone()
    sglang[:, 0].div_(torch.tensor(0.5))
    sglang[:, 1].div_(torch.tensor(0.5))
    assert torch.equal(_bytes(got_k), _bytes(sglang.to(E5M2)))


def test_fp8_formats_and_scales_not_served_are_refused():
    for name in ("fp8_ds_mla", "fp8_inc", "mxfp8", "fp8_per_token_head", "auto"):
        with pytest.raises(ValueError, match=rf"kv_cache_dtype '{name}' is not an FP8 format"):
            fp8.fp8_dtype(name)
    with pytest.raises(TypeError, match="uint8 storage or a float8 view"):
        fp8.view_as_fp8(torch.zeros(4, dtype=torch.bfloat16), "fp8")
    k = torch.zeros(2, 16, 2, 8, dtype=E4M3)
    with pytest.raises(ValueError, match=r"k_scale has shape \(3,\); accepted: \[\] .* \[2\]"):
        PagedKVCache(k, k, torch.ones(3))
    with pytest.raises(ValueError, match="v_scale applies to FP8 caches"):
        PagedKVCache(k.bfloat16(), k.bfloat16(), None, 0.5)
    for bad in (0.0, -1.0, float("inf"), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
            PagedKVCache(k, k, bad).scales_per_head()
