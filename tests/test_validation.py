"""Bad input raises before launch, naming the argument and what is accepted."""

from __future__ import annotations

import pytest
import torch

import attn_backend
from attn_backend import PagedKVCache
from attn_backend.cuda_graph import PlanWorkspace


def _cache(page_size=16, heads=2, dk=8, dv=8, dtype=torch.float32):
    return PagedKVCache.from_sglang(torch.randn(4 * page_size, heads, dk, dtype=dtype),
                                    torch.randn(4 * page_size, heads, dv, dtype=dtype), page_size)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "key": a["key"][:, :1]}, r"key has size 1 in dimension 1; expected 2"),
    (lambda a: {**a, "value": torch.randn(3, 2, 4)}, r"value has size 4 in dimension 2"),
    (lambda a: {**a, "slots": a["slots"].float()}, r"slots has dtype float32; accepted: int32, int64"),
    (lambda a: {**a, "slots": a["slots"][:2]}, r"slots has size 2 in dimension 0; expected 3"),
    (lambda a: {**a, "key": a["key"][0]}, r"key must have 3 dimensions"),
    (lambda a: {**a, "slots": torch.tensor([0, 64, 1])}, r"slots holds values in \[0, 64\]; accepted: \[-1, 63\]"),
    (lambda a: {**a, "slots": torch.tensor([0, -2, 1])}, r"slots holds values in \[-2, 1\]"),
    (lambda a: {**a, "key": "nope"}, r"key must be a torch.Tensor"),
])
def test_write_kv_rejects_bad_arguments(change, match):
    args = {"cache": _cache(), "slots": torch.tensor([0, 5, -1]), "key": torch.randn(3, 2, 8),
            "value": torch.randn(3, 2, 8)}
    with pytest.raises((ValueError, TypeError), match=match):
        attn_backend.write_kv(**change(args))


def test_out_of_range_slots_pass_silently_only_without_debug_checks():
    args = {"cache": _cache(), "slots": torch.tensor([70]), "key": torch.randn(1, 2, 8),
            "value": torch.randn(1, 2, 8)}
    attn_backend.set_debug_checks(False)
    try:
        with pytest.raises(IndexError):  # the CPU reference indexes out of range
            attn_backend.write_kv(**args)
    finally:
        attn_backend.set_debug_checks(True)


def test_cache_views_reject_mismatched_halves():
    with pytest.raises(ValueError, match="must agree in pages"):
        PagedKVCache(torch.randn(4, 16, 2, 8), torch.randn(4, 16, 3, 8))
    with pytest.raises(ValueError, match="head_dim_k=16"):
        PagedKVCache.from_vllm(torch.randn(4, 2, 16, 16), 16)
    with pytest.raises(ValueError, match="kv_lora_rank=41"):
        PagedKVCache.from_mla(torch.randn(64, 1, 40), 41, 16)
    no_rope = PagedKVCache.from_mla(torch.randn(64, 1, 40), 40, 16)  # V is the whole row
    assert no_rope.head_dim_k == no_rope.head_dim_v == 40


def test_cache_views_share_storage_with_engine_tensors():
    kv = torch.zeros(3, 2, 16, 24)
    cache = PagedKVCache.from_vllm(kv, 16)
    cache.v[1, 5, 0] = 7.0
    assert kv[1, 0, 5, 16:].eq(7.0).all() and kv[1, 0, 5, :16].eq(0).all()
    mla = torch.zeros(64, 1, 40)
    mla_cache = PagedKVCache.from_mla(mla, 32, 16)
    mla_cache.k[2, 3, 0] = 1.0
    assert mla[35, 0].eq(1.0).all() and mla_cache.v[2, 3, 0].eq(1.0).all()


def test_plan_workspace_keeps_its_address_and_uploads_its_prefix():
    workspace = PlanWorkspace(64, 16, "cpu")
    address = workspace.tensor.data_ptr()
    workspace.tensor[40] = 7  # a merge counter's byte: never overwritten by an upload
    workspace.host_view(0, 4)[:] = [1, 2, 3, 4]
    workspace.upload()
    assert workspace.tensor[:16].view(torch.int32).tolist() == [1, 2, 3, 4]
    workspace.host_view(4, 1)[:] = 9
    workspace.upload()
    assert workspace.tensor.data_ptr() == address
    assert workspace.tensor[:16].view(torch.int32).tolist() == [1, 9, 3, 4]
    assert workspace.tensor[40].item() == 7 and workspace.tensor[16:40].eq(0).all()
    with pytest.raises(ValueError, match="upload_bytes 65 must be in"):
        PlanWorkspace(64, 65, "cpu")


@pytest.mark.parametrize("make, match", [
    (lambda t, r, m: attn_backend.PageTable(t, slot_map=m), "applies to a table of token slots"),
    (lambda t, r, m: attn_backend.PageTable.from_req_to_token(t, r, slot_map=m.int()),
     "slot_map has dtype int32; accepted: int64"),
    (lambda t, r, m: attn_backend.PageTable.from_req_to_token(t, r, slot_map=m.view(2, -1)),
     "slot_map"),
])
def test_page_table_rejects_bad_slot_maps(make, match):
    table = torch.zeros(2, 8, dtype=torch.int32)
    rows = torch.tensor([0, 1])
    slot_map = torch.arange(16, dtype=torch.int64)
    with pytest.raises((ValueError, TypeError), match=match):
        make(table, rows, slot_map)
    mapped = attn_backend.PageTable.from_req_to_token(table, rows, slot_map=slot_map)
    assert mapped.slot_map is slot_map


def test_page_table_slots_past_the_slot_map_raise_on_the_host():
    table = torch.tensor([[3, 20]], dtype=torch.int32)
    mapped = attn_backend.PageTable.from_req_to_token(table, torch.tensor([0]),
                                                      slot_map=torch.arange(16))
    with pytest.raises(ValueError, match=r"holds slots in \[3, 20\]; slot_map has 16 entries"):
        mapped.token_slots(1, [2], page_size=1)
    assert mapped.token_slots(1, [1], page_size=1)[1].tolist() == [3]


def test_mla_head_dims_run_on_prefill_over_one_latent_row():
    from attn_backend._validation import MLA_HEAD_DIMS, check_kernel_shape

    bf16 = torch.bfloat16
    check_kernel_shape(16, 1, *MLA_HEAD_DIMS, bf16, bf16, on_cuda=True, serves_mla=True)
    check_kernel_shape(128, 1, *MLA_HEAD_DIMS, bf16, bf16, on_cuda=True, serves_mla=True)
    with pytest.raises(ValueError, match="run on PagedPrefill"):
        check_kernel_shape(16, 1, *MLA_HEAD_DIMS, bf16, bf16, on_cuda=True)
    with pytest.raises(ValueError, match="16 query heads over 2 kv heads"):
        check_kernel_shape(16, 2, *MLA_HEAD_DIMS, bf16, bf16, on_cuda=True, serves_mla=True)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):  # FP8 latent caches
        check_kernel_shape(16, 1, *MLA_HEAD_DIMS, bf16, fp8, on_cuda=True, serves_mla=True)
    with pytest.raises(TypeError, match="the cache the query's type or FP8"):
        check_kernel_shape(16, 1, *MLA_HEAD_DIMS, bf16, torch.float16, on_cuda=True,
                           serves_mla=True)
    check_kernel_shape(16, 2, 40, 32, bf16, bf16, on_cuda=False)  # the reference serves any
    # the MHA prefill of the same models: prefill shapes, 16-bit caches
    check_kernel_shape(16, 16, 192, 128, bf16, bf16, on_cuda=True, serves_mla=True)
    with pytest.raises(ValueError, match=r"\(192, 128\).*run on PagedPrefill"):
        check_kernel_shape(16, 16, 192, 128, bf16, bf16, on_cuda=True)
    with pytest.raises(TypeError, match="the cache the query's type"):
        check_kernel_shape(16, 16, 192, 128, bf16, torch.float8_e5m2, on_cuda=True,
                           serves_mla=True)


def test_fp8_mla_caches_carry_one_scale_for_the_row():
    """from_mla / from_vllm_mla with an FP8 buffer: the scale is K's and V's (V is part of the
    row), the reference reads stored * scale, and a scale per anything else is refused."""
    from attn_backend import PagedPrefill, PageTable

    gen = torch.Generator().manual_seed(6)
    page_size, rank, rope, heads = 4, 48, 16, 4
    values = torch.randn(3 * page_size, 1, rank + rope, generator=gen)
    stored = (values / 0.5).to(torch.float8_e4m3fn)
    cache = PagedKVCache.from_mla(stored, rank, page_size, scale=0.5)
    assert (cache.k_scale, cache.v_scale) == (0.5, 0.5) and cache.is_fp8
    blocks = PagedKVCache.from_vllm_mla(stored.view(3, page_size, rank + rope), rank,
                                        scale=torch.tensor(0.5))
    assert float(blocks.k_scale) == float(blocks.v_scale) == 0.5
    held = PagedKVCache.from_mla(stored.float() * 0.5, rank, page_size)
    q = torch.randn(2, heads, rank + rope, generator=gen)
    table = PageTable.from_block_table(torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=torch.int32))

    def run(over):
        mla = PagedPrefill(num_qo_heads=heads, num_kv_heads=1, head_dim=rank + rope,
                           head_dim_vo=rank, dtype=torch.float32, kv_dtype=over.dtype,
                           device="cpu")
        mla.plan([0, 1, 2], [5, 12])
        return mla.run(q, over, table)

    torch.testing.assert_close(run(cache), run(held))  # FP8 rows read as the values they hold
    with pytest.raises(ValueError, match=r"k_scale has shape \(2,\)"):
        PagedKVCache.from_mla(stored, rank, page_size, scale=torch.tensor([0.5, 1.0]))


def test_mla_on_the_reference_path_matches_the_absorbed_form():
    """PagedPrefill with MLA's head dims on CPU: the float reference over a from_mla cache,
    the same as reference.mla_attention with the query split in its latent and rope parts."""
    from attn_backend import PagedPrefill, PageTable, reference

    gen = torch.Generator().manual_seed(5)
    page_size, rank, rope, heads = 4, 48, 16, 8
    latent = torch.randn(6 * page_size, 1, rank + rope, generator=gen)
    cache = PagedKVCache.from_mla(latent, rank, page_size)
    table = torch.tensor([[5, 2, 0], [3, 1, 4]], dtype=torch.int32)
    kv_lens, q_lens = [9, 12], [1, 3]
    q = torch.randn(sum(q_lens), heads, rank + rope, generator=gen)
    mla = PagedPrefill(num_qo_heads=heads, num_kv_heads=1, head_dim=rank + rope,
                       head_dim_vo=rank, dtype=torch.float32, device="cpu")
    mla.plan([0, 1, 4], kv_lens)
    got = mla.run(q, cache, PageTable.from_block_table(table), sm_scale=0.125)
    slots = torch.cat([table[r].long().repeat_interleave(page_size)[:n] * page_size +
                       torch.arange(n) % page_size for r, n in enumerate(kv_lens)])
    want = reference.mla_attention(q[..., :rank], q[..., rank:], [0, 1, 4], cache, [0, 9, 21],
                                   slots, sm_scale=0.125)
    torch.testing.assert_close(got.float(), want.out)
    assert got.shape == (4, heads, rank)
