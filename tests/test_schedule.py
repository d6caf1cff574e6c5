"""The split-KV decode schedule covers every visible key exactly once and fits its grid."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_backend.schedule import (MIN_CHUNK_TOKENS, TILE_TOKENS, graph_grid_size, kv_ranges,
                                   plan_decode)

from .helpers import native_decode_planner


@settings(max_examples=300, deadline=None)
@given(kv_lens=st.lists(st.integers(0, 40000), min_size=1, max_size=300),
       num_kv_heads=st.sampled_from([1, 2, 8, 32]),
       cta_slots=st.sampled_from([132, 264, 396]),
       window_left=st.sampled_from([-1, 0, 100, 4095]))
def test_schedule_partitions_each_request(kv_lens, num_kv_heads, cta_slots, window_left):
    lens = np.array(kv_lens)
    schedule = plan_decode(lens, window_left=window_left, num_kv_heads=num_kv_heads,
                           cta_slots=cta_slots)
    request, start, end, partial = schedule.items
    starts, ends = kv_ranges(lens, window_left)
    assert schedule.num_items <= graph_grid_size(len(lens), num_kv_heads, cta_slots)
    for r in range(len(lens)):
        mine = np.flatnonzero(request == r)
        assert len(mine) >= 1
        # Contiguous, ordered, non-empty (except an empty request) chunks tiling [start, end).
        assert start[mine[0]] == starts[r] and end[mine[-1]] == ends[r]
        assert np.all(start[mine[1:]] == end[mine[:-1]])
        if len(mine) > 1:
            assert np.all(end[mine] > start[mine])
            assert np.all((end[mine[:-1]] - start[mine[:-1]]) % TILE_TOKENS == 0)
            first, last = schedule.merge_indptr[r], schedule.merge_indptr[r + 1]
            assert list(partial[mine]) == list(range(first, last))
        else:
            assert partial[mine[0]] == -1
            assert schedule.merge_indptr[r] == schedule.merge_indptr[r + 1]
    if schedule.num_items > len(lens):  # a split happened: chunks are whole tiles, not tiny
        assert schedule.chunk_tokens >= MIN_CHUNK_TOKENS
        assert schedule.chunk_tokens % TILE_TOKENS == 0
    sizes = end - start
    assert np.all(sizes[:-1] >= sizes[1:])  # longest first


def test_chunks_make_near_whole_waves():
    # One 32k request over 396 CTA slots: about one wave of 8-head items.
    single = plan_decode(np.array([32768]), window_left=-1, num_kv_heads=8, cta_slots=396)
    assert single.chunk_tokens == 704 and single.num_items * 8 <= 396
    # 64 x 4k: 512 whole-request CTAs would be 1.29 waves; thirds make 3.9 waves.
    batch = plan_decode(np.full(64, 4096), window_left=-1, num_kv_heads=8, cta_slots=396)
    assert batch.chunk_tokens == 1408 and batch.num_items == 192
    # When whole requests already make whole waves, nothing is split.
    even = plan_decode(np.full(99, 4096), window_left=-1, num_kv_heads=4, cta_slots=396)
    assert even.num_items == 99 and even.num_partials == 0


@settings(max_examples=300, deadline=None)
@given(kv_lens=st.lists(st.integers(0, 40000), min_size=1, max_size=300),
       num_kv_heads=st.sampled_from([1, 2, 8, 32]),
       cta_slots=st.sampled_from([132, 264, 396]),
       window_left=st.sampled_from([-1, 0, 100, 4095]),
       graph=st.booleans())
def test_native_decode_planner_matches_plan_decode(kv_lens, num_kv_heads, cta_slots, window_left,
                                                   graph):
    """The C++ planner the GPU path runs gives plan_decode()'s schedule, item for item."""
    import torch

    from attn_backend.schedule import max_items_per_head

    planner = native_decode_planner()
    lens = np.array(kv_lens, dtype=np.int64)
    want = plan_decode(lens, window_left=window_left, num_kv_heads=num_kv_heads,
                       cta_slots=cta_slots)
    capacity = max_items_per_head(len(lens), num_kv_heads, cta_slots)
    grid = graph_grid_size(len(lens), num_kv_heads, cta_slots) if graph else -1
    schedule = torch.full((4, capacity), 12345, dtype=torch.int32)
    merge_indptr = torch.full((len(lens) + 3,), 12345, dtype=torch.int32)
    num_items, chunk = planner(torch.from_numpy(lens), window_left, num_kv_heads, cta_slots,
                               max_items_per_head(len(lens), num_kv_heads, cta_slots), grid,
                               schedule, merge_indptr)
    assert (num_items, chunk) == (want.num_items, want.chunk_tokens)
    np.testing.assert_array_equal(schedule[:, :num_items].numpy(), want.items)
    np.testing.assert_array_equal(merge_indptr[: len(lens) + 1].numpy(), want.merge_indptr)
    if graph:  # the rest of the graph's grid: unused slots
        np.testing.assert_array_equal(schedule[:, num_items:grid].numpy().T,
                                      np.tile([-1, 0, 0, -1], (grid - num_items, 1)))


def test_native_decode_planner_rejects_a_grid_too_small():
    import pytest
    import torch

    planner = native_decode_planner()
    lens = torch.tensor([40000, 3], dtype=torch.int64)
    schedule = torch.zeros(4, 64, dtype=torch.int32)
    merge_indptr = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="does not fit its grid of 2"):
        planner(lens, -1, 8, 264, 100, 2, schedule, merge_indptr)
