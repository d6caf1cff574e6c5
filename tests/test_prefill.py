"""PagedPrefill's host side on the CPU (its planner: test_schedule.py; the kernel: the GPU tests)."""

from __future__ import annotations

import pytest
import torch

from attn_backend import PagedPrefill, PageTable, reference
from attn_backend.schedule import TileShape, prefill_grid_size

from .helpers import PagedProblem, allocate_pages, make_cache, needs_extension


def cpu_problem(q_lens, kv_lens, seed):
    gen = torch.Generator().manual_seed(seed)
    tables, num_pages = allocate_pages(kv_lens, 16, gen)
    cache = make_cache("vllm_nhd", num_pages, 16, 2, 64, 64, torch.float32, "cpu", gen)
    problem = PagedProblem(cache, tables, kv_lens, q_lens)
    table = torch.zeros(len(kv_lens), max(len(t) for t in tables) + 1, dtype=torch.int32)
    for r, pages in enumerate(tables):
        table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen)
    return problem, PageTable.from_block_table(table), q


def test_cpu_run_is_the_reference_with_the_planned_mask_and_window(seed):
    q_lens, kv_lens = [2, 3], [20, 9]
    problem, table, q = cpu_problem(q_lens, kv_lens, seed)
    mask = torch.rand(2 * 20 + 3 * 9) < 0.5
    prefill = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                           device="cpu", max_batch_size=4, max_num_tokens=16)
    prefill.plan([0, 2, 5], kv_lens, custom_mask=mask, window_left=4)
    got, lse = prefill.run(q, problem.cache, table, return_lse=True)
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, [0, 2, 5], problem.cache, kv_indptr, kv_slots,
                               custom_mask=mask, window_left=4)
    torch.testing.assert_close(got, want.out)
    torch.testing.assert_close(lse, want.lse)


def make_cpu_prefill(**kwargs):
    return PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                        device="cpu", max_batch_size=4, max_num_tokens=16, **kwargs)


def test_constructor_names_the_backends_it_takes():
    with pytest.raises(ValueError, match="backend='fa3'; accepted: auto, mma, wgmma"):
        make_cpu_prefill(backend="fa3")
    with pytest.raises(ValueError, match="max_num_tokens must be >= 1"):
        PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                     device="cpu", max_num_tokens=0)


@pytest.mark.parametrize("plan_args, match", [
    (([0, 3], [2]), r"request 0: kv_len 2 < q_len 3"),
    (([0, 3, 2], [5, 5]), "non-decreasing offsets"),
    (([0, 20], [30]), "20 query tokens; this PagedPrefill holds max_num_tokens=16"),
    (([0] * 6, [1] * 5), "5 requests; accepted: 1..4"),
    (([0, 1], [-1]), r"kv_lens must be in \[0, 2\*\*31\); got \[-1, -1\]"),
])
def test_plan_rejects_inconsistent_lengths(plan_args, match):
    with pytest.raises(ValueError, match=match):
        make_cpu_prefill().plan(*plan_args)


def test_plan_rejects_masks_that_do_not_match_the_lengths():
    prefill = make_cpu_prefill()
    with pytest.raises(ValueError, match="custom_mask has 5 elements; the lengths need 6"):
        prefill.plan([0, 2], [3], custom_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_indptr has 3 entries; expected 2"):
        prefill.plan([0, 2], [3], custom_mask=torch.ones(6, dtype=torch.bool),
                     mask_indptr=[0, 6, 6])
    with pytest.raises(ValueError, match="must fit between mask_indptr"):
        prefill.plan([0, 2, 3], [3, 3], custom_mask=torch.ones(12, dtype=torch.bool),
                     mask_indptr=[0, 4, 12])
    with pytest.raises(TypeError, match="custom_mask must be a bool"):
        prefill.plan([0, 2], [3], custom_mask=torch.ones(6))


def test_run_rejects_queries_that_do_not_match_the_plan(seed):
    problem, table, q = cpu_problem([2, 3], [20, 9], seed)
    prefill = make_cpu_prefill()
    with pytest.raises(RuntimeError, match="before plan"):
        prefill.run(q, problem.cache, table)
    prefill.plan([0, 2, 5], [20, 9])
    with pytest.raises(ValueError, match="q has size 4 in dimension 0; expected 5"):
        prefill.run(q[:4], problem.cache, table)
    with pytest.raises(ValueError, match="logits_soft_cap must be >= 0"):
        prefill.run(q, problem.cache, table, logits_soft_cap=-1.0)


@needs_extension
def test_graph_grid_is_sized_by_the_captured_token_count():
    """vLLM pads a captured batch with empty requests and spare tokens: the grid must be the
    one the capture had, so it is sized by the padded token count, not the requests' sum."""
    prefill = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                           device="cpu", max_batch_size=8, max_num_tokens=64,
                           use_cuda_graph=True, cta_slots=64)
    qo, kv = [0, 4, 8, 12, 12, 12], [30, 9, 100, 0, 0]  # 3 requests of 4 tokens, 2 padding
    prefill.plan(qo, kv, graph_num_tokens=20)  # the capture's 5 x 4 tokens
    assert prefill._planned.tile_rows == prefill.narrow_tile_rows  # 4 tokens x group 4 rows
    narrow = TileShape(prefill.narrow_tile_rows, prefill._planned.config.kv_tile_tokens)
    assert prefill._planned.num_work_items == prefill_grid_size(20, 5, 4, narrow, 2, 64)
    with pytest.raises(ValueError, match="graph_num_tokens=11; accepted: from the batch's 12"):
        prefill.plan(qo, kv, graph_num_tokens=11)
    with pytest.raises(ValueError, match="graph_num_tokens=65; .* max_num_tokens=64"):
        prefill.plan(qo, kv, graph_num_tokens=65)


@needs_extension
def test_short_queries_take_the_short_tiles_and_graphs_keep_their_shape():
    """Eager plans pick the tile shape from the longest request; a graph-mode plan from what
    is fixed per captured graph (tokens per request), so a replay launches the captured kernel."""
    shape = dict(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                 device="cpu", max_batch_size=8, max_num_tokens=256, cta_slots=64)
    eager = PagedPrefill(**shape)
    assert (eager.narrow_tile_rows, eager.short_tile_rows) == (16, 64)
    eager.plan([0, 4, 8], [100, 200])  # 16 rows per request
    assert eager._planned.config.name == "prefill_short_keysplit"
    eager.plan([0, 4, 9], [100, 200])  # 20 rows in the second request
    assert eager._planned.config.name == "prefill_short"
    eager.plan([0, 4, 24], [100, 200])  # 80 rows in the second request
    assert eager._planned.tile_rows == eager.tile_rows
    graph = PagedPrefill(**shape, use_cuda_graph=True)
    graph.plan([0, 16, 32], [100, 200], graph_num_tokens=32)  # 64 rows per request
    assert graph._planned.tile_rows == graph.short_tile_rows
    # A replay of that graph whose second request has 124 rows keeps the short tiles.
    graph.plan([0, 1, 32], [100, 200], graph_num_tokens=32)
    assert graph._planned.tile_rows == graph.short_tile_rows
    short = TileShape(graph.short_tile_rows, graph._planned.config.kv_tile_tokens)
    assert graph._planned.num_work_items == prefill_grid_size(32, 2, 4, short, 2, 64)


@needs_extension
def test_d128_requests_of_up_to_16_rows_take_the_key_split_tiles():
    """At d128 a batch whose requests have at most 16 packed rows takes the key-split tiles:
    one 16-row tile per request and kv head, whatever its tokens x group. At d64 there is no
    key-split configuration: the 64-row short tile takes them."""
    shape = dict(num_qo_heads=16, num_kv_heads=2, dtype=torch.bfloat16, device="cpu",
                 max_batch_size=8, max_num_tokens=256, cta_slots=4096)
    prefill = PagedPrefill(head_dim=128, **shape)
    prefill.plan([0, 2, 3, 4], [100, 200, 3000])  # 16, 8 and 8 rows (group 8)
    assert prefill._planned.config.name == "prefill_short_keysplit"
    rows, _ = prefill.work_list_views(0)
    items = rows[:, :prefill._planned.plan["num_items"]]
    assert {(int(r), int(s)) for r, s in zip(items[0], items[1]) if r >= 0} == \
        {(0, 0), (1, 0), (2, 0)}
    prefill.plan([0, 3, 4], [100, 200])  # 24 rows
    assert prefill._planned.config.name == "prefill_short"
    narrow = PagedPrefill(head_dim=64, **shape)
    assert narrow.narrow_tile_rows is None
    narrow.plan([0, 2, 3], [100, 200])
    assert narrow._planned.config.name == "prefill_short"
