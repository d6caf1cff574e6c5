"""PagedDecode on the CPU path: both engines' page tables address the same KV."""

from __future__ import annotations

import pytest
import torch

import attn_backend
from attn_backend import PagedDecode, PagedKVCache, PageTable, reference
from attn_backend._validation import check_kernel_shape

from .helpers import PagedProblem, allocate_pages, make_cache


def engine_tables(problem: PagedProblem, max_pages: int, gen):
    """The problem's page lists as a vLLM block table and as SGLang's req_to_token rows."""
    batch, page_size = len(problem.kv_lens), problem.page_size
    block_table = torch.zeros(batch, max_pages, dtype=torch.int32)
    pool_rows = torch.randperm(batch + 3, generator=gen)[:batch] + 1  # row 0 is SGLang's padding row
    req_to_token = torch.zeros(batch + 4, max_pages * page_size, dtype=torch.int32)
    for r, pages in enumerate(problem.page_table):
        block_table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        req_to_token[pool_rows[r], : problem.kv_lens[r]] = problem.slots(r).int()
    return (PageTable.from_block_table(block_table),
            PageTable.from_req_to_token(req_to_token, pool_rows))


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_cpu_decode_matches_reference_through_both_tables(page_size, seed):
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [1, 17, 64, 200, 129]
    tables, num_pages = allocate_pages(kv_lens, page_size, gen)
    cache = make_cache("vllm_nhd", num_pages, page_size, 2, 64, 64, torch.float32, "cpu", gen)
    problem = PagedProblem(cache, tables, kv_lens, [1] * len(kv_lens))
    q = torch.randn(len(kv_lens), 8, 64, generator=gen)
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, problem.qo_indptr(), cache, kv_indptr, kv_slots,
                               window_left=30, logits_soft_cap=20.0)
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                         device="cpu", max_batch_size=8)
    decode.plan(torch.tensor(kv_lens), window_left=30)
    max_pages = max(len(pages) for pages in tables) + 2
    for page_table in engine_tables(problem, max_pages, gen):
        out, lse = decode.run(q, cache, page_table, logits_soft_cap=20.0, return_lse=True)
        torch.testing.assert_close(out, want.out)
        torch.testing.assert_close(lse, want.lse)


def test_cpu_decode_request_without_keys_gives_zero_and_minus_inf(seed):
    """vLLM pads captured batches with requests of no keys; their rows must be 0, not NaN."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [0, 40, 0]
    tables, num_pages = allocate_pages(kv_lens, 16, gen)
    cache = make_cache("vllm_nhd", num_pages + 1, 16, 2, 64, 64, torch.float32, "cpu", gen)
    problem = PagedProblem(cache, tables, kv_lens, [1] * len(kv_lens))
    q = torch.randn(len(kv_lens), 8, 64, generator=gen)
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                         device="cpu", max_batch_size=4)
    decode.plan(kv_lens)
    block_table, _ = engine_tables(problem, 4, gen)
    out, lse = decode.run(q, cache, block_table, return_lse=True)
    assert torch.all(out[[0, 2]] == 0) and torch.all(lse[[0, 2]] == float("-inf"))
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q[1:2], [0, 1], cache, kv_indptr[1:3] - kv_indptr[1],
                               kv_slots, window_left=-1)
    torch.testing.assert_close(out[1:2], want.out)


@pytest.mark.parametrize("shape, error, match", [
    (dict(head_dim=96), ValueError, r"head dims \(qk=96, vo=96\) are not compiled"),
    (dict(num_qo_heads=256, num_kv_heads=1), ValueError, "group size .* 256; supported: 1..128"),
    (dict(dtype=torch.float32), TypeError, "dtype float32; accepted: float16, bfloat16"),
    (dict(kv_dtype=torch.float16), TypeError,
     r"kv_dtype float16 with dtype bfloat16; compiled \(dtype, kv_dtype\)"),
])
def test_cuda_wrappers_refuse_what_is_not_compiled(shape, error, match):
    """What the kernels serve, checked when a wrapper is built for a CUDA device (the CPU
    reference serves any head size, group and dtype)."""
    args = dict(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                kv_dtype=torch.bfloat16)
    args.update(shape)
    with pytest.raises(error, match=match):
        check_kernel_shape(args["num_qo_heads"], args["num_kv_heads"], args["head_dim"],
                           args["head_dim"], args["dtype"], args["kv_dtype"], on_cuda=True)
    check_kernel_shape(args["num_qo_heads"], args["num_kv_heads"], args["head_dim"],
                       args["head_dim"], args["dtype"], args["kv_dtype"], on_cuda=False)
    with pytest.raises(ValueError, match="must be a positive multiple of num_kv_heads=3"):
        check_kernel_shape(8, 3, 128, 128, torch.bfloat16, torch.bfloat16, on_cuda=False)


def test_cpu_and_cpu0_are_one_device(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 8, 16, 2, 64, 64, torch.float32, "cpu", gen)
    decode = PagedDecode(num_qo_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                         device="cpu:0", max_batch_size=4)
    assert decode.device == torch.device("cpu")
    decode.plan([20, 5])
    table = PageTable(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32))
    assert decode.run(torch.randn(2, 4, 64), cache, table).shape == (2, 4, 64)


def test_requests_longer_than_the_page_table_are_refused(seed):
    """A request needing more columns than the table has: a ValueError naming page_table (the
    kernels would read past the row)."""
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 8, 16, 2, 64, 64, torch.float32, "cpu", gen)
    decode = PagedDecode(num_qo_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                         device="cpu", max_batch_size=4)
    decode.plan([33, 5])  # 3 pages of 16
    block_table = PageTable(torch.tensor([[0, 1], [4, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"page_table has 2 columns; .*\(33 keys\) needs 3"):
        decode.run(torch.randn(2, 4, 64), cache, block_table)
    slots = PageTable.from_req_to_token(torch.zeros(3, 32, dtype=torch.int32),
                                        torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="page_table has 32 columns; .* needs 33"):
        decode.run(torch.randn(2, 4, 64), cache, slots)


def test_decode_rejects_bad_run_arguments(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 8, 16, 2, 64, 64, torch.float32, "cpu", gen)
    decode = PagedDecode(num_qo_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                         device="cpu", max_batch_size=4)
    with pytest.raises(RuntimeError, match="before plan"):
        decode.run(torch.randn(2, 4, 64), cache, PageTable(torch.zeros(2, 4, dtype=torch.int32)))
    with pytest.raises(ValueError, match="kv_lens has 5 requests; accepted: 1..4"):
        decode.plan([1, 2, 3, 4, 5])
    decode.plan([20, 5])
    table = PageTable(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32))
    with pytest.raises(ValueError, match="q has size 3 in dimension 0; expected 2"):
        decode.run(torch.randn(3, 4, 64), cache, table)
    with pytest.raises(ValueError, match="q has size 5 in dimension 1; expected 4"):
        decode.run(torch.randn(2, 5, 64), cache, table)
    with pytest.raises(ValueError, match="logits_soft_cap must be >= 0"):
        decode.run(torch.randn(2, 4, 64), cache, table, logits_soft_cap=-1.0)
    with pytest.raises(TypeError, match="q has dtype bfloat16; accepted: float32"):
        decode.run(torch.randn(2, 4, 64).bfloat16(), cache, table)
    with pytest.raises(TypeError, match="k_cache has dtype float16; accepted: float32"):
        decode.run(torch.randn(2, 4, 64), PagedKVCache(cache.k.half(), cache.v.half()), table)
    with pytest.raises(ValueError, match=r"page ids in page_table holds values in \[0, 9\]"):
        decode.run(torch.randn(2, 4, 64), cache,
                   PageTable(torch.tensor([[0, 9, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)))
    with pytest.raises(ValueError, match="page_table addresses 1 requests; the batch has 2"):
        decode.run(torch.randn(2, 4, 64), cache, PageTable(torch.zeros(1, 4, dtype=torch.int32)))
    with pytest.raises(TypeError, match="page_table has dtype int64"):
        PageTable(torch.zeros(2, 4, dtype=torch.int64))
    assert attn_backend.PagedDecode is PagedDecode
