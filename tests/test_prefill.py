"""The prefill planner and PagedPrefill's host side (CPU; the kernel itself is tested on the GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_backend import PagedPrefill, PageTable, reference
from attn_backend.schedule import (max_prefill_partials_per_head, plan_prefill,
                                   prefill_grid_size)

from .helpers import PagedProblem, allocate_pages, make_cache


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 12))
    q_lens = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    prefixes = draw(st.lists(st.integers(0, 9000), min_size=batch, max_size=batch))
    return np.array(q_lens), np.array(q_lens) + np.array(prefixes)


@settings(max_examples=150, deadline=None)
@given(lens=batches(), group=st.sampled_from([1, 4, 7, 16]),
       tile_rows=st.sampled_from([64, 128]), causal=st.booleans(), has_mask=st.booleans(),
       window_left=st.sampled_from([-1, 0, 50, 4000]), num_kv_heads=st.sampled_from([1, 8, 32]),
       cta_slots=st.sampled_from([132, 264]))
def test_prefill_schedule_covers_every_visible_key_once(lens, group, tile_rows, causal, has_mask,
                                                        window_left, num_kv_heads, cta_slots):
    q_lens, kv_lens = lens
    schedule = plan_prefill(q_lens, kv_lens, group_size=group, tile_rows=tile_rows,
                            causal=causal, window_left=window_left, has_mask=has_mask,
                            num_kv_heads=num_kv_heads, cta_slots=cta_slots)
    request, row_start, kv_start, kv_end, partial, merge_group = schedule.items.astype(np.int64)
    assert schedule.num_items <= prefill_grid_size(int(q_lens.sum()), len(q_lens), group,
                                                   tile_rows, num_kv_heads, cta_slots)
    assert schedule.num_partials <= max_prefill_partials_per_head(num_kv_heads, cta_slots)
    for r, (n, length) in enumerate(zip(q_lens, kv_lens)):
        starts = sorted(set(row_start[request == r].tolist()))
        assert starts == list(range(0, n * group, tile_rows))  # every packed row, once
        for start in starts:
            mine = np.flatnonzero((request == r) & (row_start == start))
            mine = mine[np.argsort(kv_start[mine])]
            # The chunks tile one range contiguously, and it holds every key a row can see.
            assert np.all(kv_start[mine[1:]] == kv_end[mine[:-1]])
            assert np.all(kv_end[mine] > kv_start[mine])
            tokens = np.arange(start, min(start + tile_rows, n * group)) // group
            visible = reference.visibility(n, length, causal=causal and not has_mask,
                                           window_left=window_left, custom_mask=None,
                                           device="cpu")[tokens].any(0).nonzero().flatten()
            if len(visible):
                assert kv_start[mine[0]] <= visible.min() and visible.max() < kv_end[mine[-1]]
            if len(mine) == 1:
                assert partial[mine[0]] == -1 and merge_group[mine[0]] == -1
            else:
                group_id = merge_group[mine[0]]
                assert np.all(merge_group[mine] == group_id)
                first, last = schedule.merge_indptr[group_id], schedule.merge_indptr[group_id + 1]
                assert sorted(partial[mine].tolist()) == list(range(first, last))
    sizes = kv_end - kv_start
    assert np.all(sizes[:-1] >= sizes[1:])  # longest first


def test_short_extends_on_long_prefixes_are_split_to_fill_the_gpu():
    # One 16-token extend on a 32k prefix, GQA group 4: one 64-row tile per kv head.
    schedule = plan_prefill(np.array([16]), np.array([32768]), group_size=4, tile_rows=128,
                            causal=True, window_left=-1, has_mask=False, num_kv_heads=8,
                            cta_slots=264)
    assert schedule.num_tiles == 1 and schedule.num_items * 8 >= 264 // 2
    # A long prefill already fills the GPU with tiles: nothing is split.
    full = plan_prefill(np.array([8192]), np.array([8192]), group_size=4, tile_rows=128,
                        causal=True, window_left=-1, has_mask=False, num_kv_heads=8,
                        cta_slots=264)
    assert full.num_items == full.num_tiles == 256 and full.num_partials == 0


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
    prefill = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                           device="cpu", max_batch_size=4, max_num_tokens=16)
    prefill.plan([0, 2, 5], kv_lens, custom_mask=mask, window_left=4)
    got, lse = prefill.run(q, problem.cache, table, return_lse=True)
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, [0, 2, 5], problem.cache, kv_indptr, kv_slots,
                               custom_mask=mask, window_left=4)
    torch.testing.assert_close(got, want.out)
    torch.testing.assert_close(lse, want.lse)


def make_cpu_prefill(**kwargs):
    return PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                        device="cpu", max_batch_size=4, max_num_tokens=16, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(head_dim=96), ValueError, r"head dims \(qk=96, vo=96\) are not compiled"),
    (dict(num_qo_heads=68, num_kv_heads=4), ValueError, "group size .* 17; supported: 1..16"),
    (dict(dtype=torch.float32), TypeError, "accepted: float16, bfloat16"),
])
def test_constructor_rejects_what_is_not_compiled(kwargs, error, match):
    args = dict(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(error, match=match):
        PagedPrefill(**{**args, **kwargs})


@pytest.mark.parametrize("plan_args, match", [
    (([0, 3], [2]), r"request 0: kv_len 2 < q_len 3"),
    (([0, 3, 2], [5, 5]), "non-decreasing offsets"),
    (([0, 20], [30]), "20 query tokens; this PagedPrefill holds max_num_tokens=16"),
    (([0] * 6, [1] * 5), "5 requests; accepted: 1..4"),
    (([0, 1], [-1]), "kv_lens must be non-negative"),
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


def test_graph_grid_is_sized_by_the_captured_token_count():
    """vLLM pads a captured batch with empty requests and spare tokens: the grid must be the
    one the capture had, so it is sized by the padded token count, not the requests' sum."""
    prefill = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                           device="cpu", max_batch_size=8, max_num_tokens=64,
                           use_cuda_graph=True, cta_slots=64)
    qo, kv = [0, 4, 8, 12, 12, 12], [30, 9, 100, 0, 0]  # 3 requests of 4 tokens, 2 padding
    prefill.plan(qo, kv, graph_num_tokens=20)  # the capture's 5 x 4 tokens
    assert prefill._planned.tile_rows == prefill.short_tile_rows  # 4 tokens x group 4 rows
    assert prefill._planned.num_work_items == prefill_grid_size(20, 5, 4, prefill.short_tile_rows,
                                                                2, 64)
    with pytest.raises(ValueError, match="graph_num_tokens=11; accepted: from the batch's 12"):
        prefill.plan(qo, kv, graph_num_tokens=11)
    with pytest.raises(ValueError, match="graph_num_tokens=65; .* max_num_tokens=64"):
        prefill.plan(qo, kv, graph_num_tokens=65)


def test_short_queries_take_the_short_tiles_and_graphs_keep_their_shape():
    """Eager plans pick the tile shape from the longest request; a graph-mode plan from what
    is fixed per captured graph (tokens per request), so a replay launches the captured kernel."""
    shape = dict(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                 device="cpu", max_batch_size=8, max_num_tokens=256, cta_slots=64)
    eager = PagedPrefill(**shape)
    eager.plan([0, 4, 8], [100, 200])  # 16 rows per request
    assert eager._planned.tile_rows == eager.short_tile_rows
    eager.plan([0, 4, 24], [100, 200])  # 80 rows in the second request
    assert eager._planned.tile_rows == eager.tile_rows
    graph = PagedPrefill(**shape, use_cuda_graph=True)
    graph.plan([0, 16, 32], [100, 200], graph_num_tokens=32)  # 64 rows per request
    assert graph._planned.tile_rows == graph.short_tile_rows
    # A replay of that graph whose second request has 124 rows keeps the short tiles.
    graph.plan([0, 1, 32], [100, 200], graph_num_tokens=32)
    assert graph._planned.tile_rows == graph.short_tile_rows
    assert graph._planned.num_work_items == prefill_grid_size(32, 2, 4, graph.short_tile_rows,
                                                              2, 64)
