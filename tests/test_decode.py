"""PagedDecode on the CPU path: both engines' page tables address the same KV."""

from __future__ import annotations

import pytest
import torch

import attn_backend
from attn_backend import PagedDecode, PageTable, reference

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
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
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
    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                         device="cpu", max_batch_size=4)
    decode.plan(kv_lens)
    block_table, _ = engine_tables(problem, 4, gen)
    out, lse = decode.run(q, cache, block_table, return_lse=True)
    assert torch.all(out[[0, 2]] == 0) and torch.all(lse[[0, 2]] == float("-inf"))
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q[1:2], [0, 1], cache, kv_indptr[1:3] - kv_indptr[1],
                               kv_slots, window_left=-1)
    torch.testing.assert_close(out[1:2], want.out)


def test_decode_rejects_unsupported_configurations():
    with pytest.raises(ValueError, match=r"head dims \(qk=96, vo=96\) are not compiled"):
        PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=96, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="group size .* 32; supported: 1..16"):
        PagedDecode(num_qo_heads=32, num_kv_heads=1, head_dim=128, dtype=torch.bfloat16,
                    device="cpu")
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.float32,
                    device="cpu")


def test_decode_rejects_bad_run_arguments(seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 8, 16, 2, 64, 64, torch.float32, "cpu", gen)
    decode = PagedDecode(num_qo_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
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
    with pytest.raises(ValueError, match=r"page ids in page_table holds values in \[0, 9\]"):
        decode.run(torch.randn(2, 4, 64), cache,
                   PageTable(torch.tensor([[0, 9, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)))
    with pytest.raises(ValueError, match="page_table addresses 1 requests; the batch has 2"):
        decode.run(torch.randn(2, 4, 64), cache, PageTable(torch.zeros(1, 4, dtype=torch.int32)))
    with pytest.raises(TypeError, match="page_table has dtype int64"):
        PageTable(torch.zeros(2, 4, dtype=torch.int64))
    assert attn_backend.PagedDecode is PagedDecode
