"""Bad input: a Python exception naming the argument, or (debug checks off, on the GPU) no access
outside the buffers and a live CUDA context; NaN/Inf stay in the requests that hold them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attn_backend
from attn_backend import PagedDecode, PagedPrefill, PageTable, reference

from .helpers import TOLERANCE, build_paged_problem, make_cache, needs_extension


def _cpu_decode(**kwargs):
    return PagedDecode(num_qo_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                       device="cpu", max_batch_size=4, **kwargs)


def test_empty_batches_are_refused():
    with pytest.raises(ValueError, match=r"kv_lens has 0 requests; accepted: 1..4"):
        _cpu_decode().plan([])
    prefill = PagedPrefill(num_qo_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                           device="cpu", max_batch_size=4, max_num_tokens=8)
    with pytest.raises(ValueError, match=r"kv_lens has 0 requests; accepted: 1..4"):
        prefill.plan([0], [])


def test_the_seesaw_backend_is_refused_outside_16_bit_mla_caches():
    with pytest.raises(ValueError, match=r"backend='seesaw' is MLA's latent kernel .* head dims "
                                         r"\(128, 128\) take 'auto', 'mma' or 'wgmma'"):
        PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                     device="cpu", max_batch_size=2, max_num_tokens=8, backend="seesaw")
    with pytest.raises(ValueError, match=r"backend='seesaw' reads 16-bit latent caches; kv_dtype "
                                         r"torch.float8_e4m3fn takes backend='wgmma'"):
        PagedPrefill(num_qo_heads=16, num_kv_heads=1, head_dim=576, head_dim_vo=512,
                     dtype=torch.bfloat16, kv_dtype=torch.float8_e4m3fn, device="cpu",
                     max_batch_size=2, max_num_tokens=8, backend="seesaw")


def test_row_indices_outside_the_table_are_named(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 8, 16, 2, 64, 64, torch.float32, "cpu", gen)
    decode = _cpu_decode()
    decode.plan([5, 3])
    req_to_token = torch.zeros(3, 16, dtype=torch.int32)
    for rows, bad in (([1, 3], 3), ([-1, 2], -1)):
        table = PageTable.from_req_to_token(req_to_token, torch.tensor(rows))
        with pytest.raises(ValueError, match=rf"req_pool_indices .* holds {bad}; the table has "
                                             r"rows 0..2"):
            decode.run(torch.randn(2, 4, 64), cache, table)


def test_slots_outside_the_slot_map_are_named(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 8, 16, 2, 64, 64, torch.float32, "cpu", gen)
    decode = _cpu_decode()
    decode.plan([3])
    slot_map = torch.arange(20)
    for slots in ([0, -3, 2], [0, 1, 20]):
        table = PageTable.from_req_to_token(torch.tensor([slots], dtype=torch.int32),
                                            torch.tensor([0]), slot_map=slot_map)
        with pytest.raises(ValueError, match=r"page_table row 0 holds slots in .*slot_map has 20"):
            decode.run(torch.randn(1, 4, 64), cache, table)


@needs_extension
def test_a_graph_plan_larger_than_its_buffers_is_refused():
    prefill = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                           device="cpu", max_batch_size=2, max_num_tokens=8,
                           max_mask_elements=20, use_cuda_graph=True, cta_slots=64)
    with pytest.raises(ValueError, match="the lengths use 32 elements; .* max_mask_elements=24"):
        prefill.plan([0, 4], [8], custom_mask=torch.ones(32, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_num_tokens=8"):
        prefill.plan([0, 9], [9])
    with pytest.raises(ValueError, match="accepted: 1..2"):
        prefill.plan([0, 1, 2, 3], [1, 1, 1])


@pytest.mark.gpu
def test_bad_tables_without_debug_checks_leave_the_context_alive():
    """Page ids past the cache, slots past the slot map and rows past the table, debug checks
    off: the calls run (no device assert), and the calls after them are right; that they
    touch nothing outside the buffers is what compute-sanitizer's memcheck shows over the
    same calls (scripts/gpu_sanitize.sh)."""
    from bench import sanitizer_cases

    try:
        assert all(sanitizer_cases.bad_inputs())
    finally:
        attn_backend.set_debug_checks(True)


@pytest.mark.gpu
def test_page_ids_outside_the_cache_are_named_with_debug_checks(seed):
    gen = torch.Generator().manual_seed(seed)
    problem, table, q = build_paged_problem([1, 1], [40, 7], page_size=16, num_kv_heads=2,
                                            group=4, head_dim=128, dtype=torch.bfloat16,
                                            layout="vllm_nhd", gen=gen)
    table.table[0, 1] = problem.cache.num_pages
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                         device="cuda", max_batch_size=4)
    decode.plan([40, 7])
    attn_backend.set_debug_checks(True)
    with pytest.raises(ValueError, match="page ids in page_table"):
        decode.run(q, problem.cache, table)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_nan_and_inf_stay_in_the_requests_that_hold_them(kind, seed):
    """Documented behaviour: a NaN or Inf in a request's queries or keys/values gives that
    request's affected rows whatever IEEE arithmetic makes of them; the call returns, and
    every other request is exact."""
    gen = torch.Generator().manual_seed(seed)
    q_lens = [1] * 4 if kind == "decode" else [3, 1, 5, 2]
    kv_lens = [300, 41, 17, 900]
    problem, table, q = build_paged_problem(q_lens, kv_lens, page_size=16, num_kv_heads=2,
                                            group=4, head_dim=128, dtype=torch.bfloat16,
                                            layout="sglang", gen=gen)
    q[0, 0, 5] = float("nan")  # request 0's first query
    _, slots = problem.kv_csr()
    page, offset = problem.cache.page_and_offset(slots[kv_lens[0] + 3:kv_lens[0] + 4])
    problem.cache.k[page, offset, 1, 7] = float("inf")  # a key of request 1
    problem.cache.v[page, offset, 0, 2] = float("-inf")
    if kind == "decode":
        wrapper = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128,
                              dtype=torch.bfloat16, device="cuda", max_batch_size=4)
        wrapper.plan(kv_lens)
    else:
        wrapper = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128,
                               dtype=torch.bfloat16, device="cuda", max_batch_size=4)
        wrapper.plan(np.concatenate([[0], np.cumsum(q_lens)]), kv_lens)
    out = torch.full_like(q, float("nan"))
    wrapper.run(q, problem.cache, table, out=out)
    torch.cuda.synchronize()
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, problem.qo_indptr(), problem.cache, kv_indptr, kv_slots)
    clean = slice(q_lens[0] + q_lens[1], None)  # requests 2 and 3
    torch.testing.assert_close(out[clean].float(), want.out[clean],
                               atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])
    assert not torch.isfinite(out[0, 0]).all()  # the NaN query's head
