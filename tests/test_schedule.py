"""The planner: the numpy specification (attn_backend/schedule.py) covers every visible key
exactly once and fits its grids, and the C++ planner that plan() runs gives the same schedule,
item for item, for the tile facts of the compiled kernel configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_backend import PagedDecode, PagedPrefill, reference
from attn_backend.schedule import (TileShape, choose_chunk, choose_prefill_shape, kv_ranges,
                                   max_decode_items, max_prefill_partials, plan_decode,
                                   plan_prefill, prefill_grid_size, tile_shape)

from .helpers import needs_extension

DECODE_SHAPES = (TileShape(16, 64), TileShape(16, 48))


@settings(max_examples=300, deadline=None)
@given(kv_lens=st.lists(st.integers(0, 40000), min_size=1, max_size=300),
       num_kv_heads=st.sampled_from([1, 2, 8, 32]), group=st.sampled_from([1, 4, 16, 17, 64, 128]),
       shape=st.sampled_from(DECODE_SHAPES), cta_slots=st.sampled_from([132, 264, 396]),
       window_left=st.sampled_from([-1, 0, 100, 4095]))
def test_decode_schedule_partitions_each_request(kv_lens, num_kv_heads, group, shape, cta_slots,
                                                 window_left):
    lens = np.array(kv_lens)
    schedule = plan_decode(lens, window_left=window_left, num_kv_heads=num_kv_heads,
                           group_size=group, shape=shape, cta_slots=cta_slots)
    request, row_start, start, end, partial, merge_group = schedule.items.astype(np.int64)
    starts, ends = kv_ranges(lens, window_left)
    row_tiles = -(-group // shape.rows)
    assert schedule.num_items <= max_decode_items(len(lens), num_kv_heads, group, shape, cta_slots)
    for r in range(len(lens)):
        for tile in range(row_tiles):
            mine = np.flatnonzero((request == r) & (row_start == tile * shape.rows))
            mine = mine[np.argsort(start[mine])]
            assert len(mine) >= 1
            # Contiguous, non-empty (except an empty request) chunks tiling [start, end).
            assert start[mine[0]] == starts[r] and end[mine[-1]] == ends[r]
            assert np.all(start[mine[1:]] == end[mine[:-1]])
            if len(mine) > 1:
                assert np.all(end[mine] > start[mine])
                assert np.all((end[mine[:-1]] - start[mine[:-1]]) % shape.kv_tokens == 0)
                g = merge_group[mine[0]]
                assert np.all(merge_group[mine] == g)
                first, last = schedule.merge_indptr[g], schedule.merge_indptr[g + 1]
                assert sorted(partial[mine].tolist()) == list(range(first, last))
            else:
                assert partial[mine[0]] == -1 and merge_group[mine[0]] == -1
    assert set(row_start.tolist()) <= set(range(0, group, shape.rows))
    if schedule.num_partials:  # a split happened: chunks are whole tiles, not tiny
        assert schedule.chunk_tokens >= shape.kv_tokens
        assert schedule.chunk_tokens % shape.kv_tokens == 0
    sizes = end - start
    assert np.all(sizes[:-1] >= sizes[1:])  # longest first


def test_decode_chunks_make_near_whole_waves():
    shape = TileShape(16, 64)
    # One 32k request over 396 CTA slots: about one wave of 8-head items.
    single = plan_decode(np.array([32768]), window_left=-1, num_kv_heads=8, group_size=4,
                         shape=shape, cta_slots=396)
    assert single.chunk_tokens == 704 and single.num_items * 8 <= 396
    # 64 x 4k: 512 whole-request CTAs would be 1.29 waves; thirds make 3.9 waves.
    batch = plan_decode(np.full(64, 4096), window_left=-1, num_kv_heads=8, group_size=4,
                        shape=shape, cta_slots=396)
    assert batch.chunk_tokens == 1408 and batch.num_items == 192
    # When whole requests already make whole waves, nothing is split.
    even = plan_decode(np.full(99, 4096), window_left=-1, num_kv_heads=4, group_size=4,
                       shape=shape, cta_slots=396)
    assert even.num_items == 99 and even.num_partials == 0
    # A group of 64 heads is four row tiles per chunk, adjacent in the work list.
    mqa = plan_decode(np.array([5000, 300]), window_left=-1, num_kv_heads=1, group_size=64,
                      shape=shape, cta_slots=264)
    request, row_start = mqa.items[0], mqa.items[1]
    assert list(row_start[:4]) == [0, 16, 32, 48] and len(set(request[:4])) == 1


@st.composite
def prefill_batches(draw):
    batch = draw(st.integers(1, 12))
    q_lens = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    prefixes = draw(st.lists(st.integers(0, 9000), min_size=batch, max_size=batch))
    return np.array(q_lens), np.array(q_lens) + np.array(prefixes)


@settings(max_examples=150, deadline=None)
@given(lens=prefill_batches(), group=st.sampled_from([1, 4, 7, 16, 128]),
       shape=st.sampled_from([TileShape(64, 64), TileShape(192, 128), TileShape(256, 64)]),
       causal=st.booleans(), has_mask=st.booleans(),
       window_left=st.sampled_from([-1, 0, 50, 4000]), num_kv_heads=st.sampled_from([1, 8, 32]),
       cta_slots=st.sampled_from([132, 264]))
def test_prefill_schedule_covers_every_visible_key_once(lens, group, shape, causal, has_mask,
                                                        window_left, num_kv_heads, cta_slots):
    q_lens, kv_lens = lens
    schedule = plan_prefill(q_lens, kv_lens, group_size=group, shape=shape, causal=causal,
                            window_left=window_left, has_mask=has_mask,
                            num_kv_heads=num_kv_heads, cta_slots=cta_slots)
    request, row_start, kv_start, kv_end, partial, merge_group = schedule.items.astype(np.int64)
    assert schedule.num_items <= prefill_grid_size(int(q_lens.sum()), len(q_lens), group, shape,
                                                   num_kv_heads, cta_slots)
    assert schedule.num_partials <= max_prefill_partials(num_kv_heads, cta_slots)
    for r, (n, length) in enumerate(zip(q_lens, kv_lens)):
        starts = sorted(set(row_start[request == r].tolist()))
        assert starts == list(range(0, n * group, shape.rows))  # every packed row, once
        for start in starts:
            mine = np.flatnonzero((request == r) & (row_start == start))
            mine = mine[np.argsort(kv_start[mine])]
            # The chunks tile one range contiguously, and it holds every key a row can see.
            assert np.all(kv_start[mine[1:]] == kv_end[mine[:-1]])
            assert np.all(kv_end[mine] > kv_start[mine])
            tokens = np.arange(start, min(start + shape.rows, n * group)) // group
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
    shape = TileShape(64, 64)
    schedule = plan_prefill(np.array([16]), np.array([32768]), group_size=4, shape=shape,
                            causal=True, window_left=-1, has_mask=False, num_kv_heads=8,
                            cta_slots=264)
    assert schedule.num_tiles == 1 and schedule.num_items * 8 >= 264 // 2
    # A long prefill already fills the GPU with tiles: nothing is split.
    full = plan_prefill(np.array([8192]), np.array([8192]), group_size=4, shape=TileShape(128, 64),
                        causal=True, window_left=-1, has_mask=False, num_kv_heads=8,
                        cta_slots=264)
    assert full.num_items == full.num_tiles == 256 and full.num_partials == 0


# ---- the C++ planner that plan() runs, against the specification ----------------------------

def assert_same_schedule(got, want):
    assert (got.num_items, got.chunk_tokens, got.num_tiles) == \
        (want.num_items, want.chunk_tokens, want.num_tiles)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.merge_indptr, want.merge_indptr)


@needs_extension
@settings(max_examples=300, deadline=None)
@given(kv_lens=st.lists(st.integers(0, 40000), min_size=1, max_size=300),
       num_kv_heads=st.sampled_from([1, 2, 8]), group=st.sampled_from([1, 4, 16, 32, 128]),
       cta_slots=st.sampled_from([132, 264, 396]), window_left=st.sampled_from([-1, 0, 100, 4095]),
       backend=st.sampled_from(["auto", "split", "full_batch"]), graph=st.booleans())
def test_cpp_decode_planner_matches_the_specification(kv_lens, num_kv_heads, group, cta_slots,
                                                      window_left, backend, graph):
    decode = PagedDecode(num_qo_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                         head_dim=128, dtype=torch.bfloat16, device="cpu", max_batch_size=300,
                         use_cuda_graph=graph, cta_slots=cta_slots, backend=backend)
    lens = np.array(kv_lens, dtype=np.int64)
    decode.plan(lens, window_left=window_left)
    config = decode._planned.config
    shape = TileShape(config.tile_rows, config.kv_tile_tokens)
    want = plan_decode(lens, window_left=window_left, num_kv_heads=num_kv_heads, group_size=group,
                       shape=shape, cta_slots=cta_slots)
    assert_same_schedule(decode.planned_schedule(), want)
    row_tiles = -(-group // config.tile_rows)
    full = backend == "full_batch" or (backend == "auto" and
                                       len(lens) * num_kv_heads * row_tiles >= cta_slots)
    assert decode._planned.full_batch == full
    grid = max_decode_items(len(lens), num_kv_heads, group, shape, cta_slots) if graph \
        else want.num_items
    assert decode._planned.num_work_items == grid
    if graph:  # the rest of the graph's grid: unused items
        rows, _ = decode.work_list_views(0)
        np.testing.assert_array_equal(rows[:, want.num_items:grid].T,
                                      np.tile([-1, 0, 0, 0, -1, -1], (grid - want.num_items, 1)))


@needs_extension
@settings(max_examples=200, deadline=None)
@given(lens=prefill_batches(), group=st.sampled_from([1, 4, 7, 16, 128]),
       causal=st.booleans(), has_mask=st.booleans(),
       window_left=st.sampled_from([-1, 0, 50, 4000]), num_kv_heads=st.sampled_from([1, 8]),
       cta_slots=st.sampled_from([132, 264]), backend=st.sampled_from(["mma", "wgmma"]),
       graph=st.booleans())
def test_cpp_prefill_planner_matches_the_specification(lens, group, causal, has_mask, window_left,
                                                       num_kv_heads, cta_slots, backend, graph):
    q_lens, kv_lens = lens
    if causal or has_mask or window_left >= 0:
        kv_lens = np.maximum(kv_lens, q_lens)
    mask = torch.ones(int((q_lens * kv_lens).sum()), dtype=torch.bool) if has_mask else None
    prefill = PagedPrefill(num_qo_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                           head_dim=128, dtype=torch.bfloat16, device="cpu", max_batch_size=12,
                           max_num_tokens=4096, use_cuda_graph=graph, cta_slots=cta_slots,
                           backend=backend,
                           max_mask_elements=mask.numel() if mask is not None else 0)
    qo = np.concatenate([[0], np.cumsum(q_lens)])
    graph_tokens = int(qo[-1]) + 7 if graph else None
    prefill.plan(qo, kv_lens, causal=causal, window_left=window_left, custom_mask=mask,
                 graph_num_tokens=graph_tokens)
    tiles = choose_prefill_shape(q_lens, group_size=group, short_rows=prefill.short_tile_rows,
                                 narrow_rows=prefill.narrow_tile_rows,
                                 graph_num_tokens=graph_tokens)
    config = prefill._planned.config
    assert config.name == {"narrow": "prefill_short_keysplit", "short": "prefill_short",
                           "long": f"prefill_{backend}"}[tiles]
    shape = TileShape(config.tile_rows, config.kv_tile_tokens)
    want = plan_prefill(q_lens, kv_lens, group_size=group, shape=shape, causal=causal,
                        window_left=window_left, has_mask=has_mask, num_kv_heads=num_kv_heads,
                        cta_slots=cta_slots)
    assert_same_schedule(prefill.planned_schedule(), want)
    grid = prefill_grid_size(graph_tokens, len(q_lens), group, shape, num_kv_heads, cta_slots) \
        if graph else want.num_items
    assert prefill._planned.num_work_items == grid


@needs_extension
@settings(max_examples=150, deadline=None)
@given(kv_lens=st.lists(st.integers(1, 40000), min_size=1, max_size=8),
       q_len=st.sampled_from([1, 2, 4]), heads=st.sampled_from([16, 32, 128]),
       cta_slots=st.sampled_from([132, 264]), backend=st.sampled_from(["mma", "wgmma"]))
def test_cpp_mla_planner_prices_its_partials_as_the_specification(kv_lens, q_len, heads,
                                                                  cta_slots, backend):
    """MLA's configurations plan with their partials' cost (scheduler::choose_chunk), C++ and
    numpy alike."""
    kv_lens = np.maximum(np.array(kv_lens, dtype=np.int64), q_len)
    q_lens = np.full(len(kv_lens), q_len, dtype=np.int64)
    mla = PagedPrefill(num_qo_heads=heads, num_kv_heads=1, head_dim=576, head_dim_vo=512,
                       dtype=torch.bfloat16, device="cpu", max_batch_size=8,
                       max_num_tokens=64, cta_slots=cta_slots, backend=backend)
    mla.plan(np.concatenate([[0], np.cumsum(q_lens)]), kv_lens)
    shape = tile_shape(mla._planned.config)
    assert shape.partial_tokens == shape.rows * 512 * 4 // 1152 > 0
    want = plan_prefill(q_lens, kv_lens, group_size=heads, shape=shape, causal=True,
                        window_left=-1, has_mask=False, num_kv_heads=1, cta_slots=cta_slots)
    assert_same_schedule(mla.planned_schedule(), want)


def test_priced_partials_bound_mla_splits():
    """One 4k request of 128 heads on the 64-row shape: free partials cut it into 64-key chunks
    (64 partials for one CTA to merge); priced ones stop near the square root of the trade."""
    lengths = np.array([4096, 4096])
    free = choose_chunk(lengths, 1, 132, 264, 32)
    priced = choose_chunk(lengths, 1, 132, 264, 32, partial_tokens=113)
    assert free == 64
    assert 256 <= priced <= 1024


@needs_extension
def test_cpp_planner_refuses_a_schedule_larger_than_its_buffers():
    """The run op's plan buffers bound what the planner writes: a plan-info record claiming
    less room than a schedule needs is refused, never written past."""
    from attn_backend._plan_run import PlanRecord

    decode = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                         device="cpu", max_batch_size=4, cta_slots=264)
    index = {name: i for i, name in enumerate(decode._ops.plan_info_fields())}
    shrunk = list(decode._setup.values)
    shrunk[index["work_capacity"]] = 2
    with pytest.raises(ValueError, match="exceed the work list.s capacity of 2"):
        decode._ops.plan_decode(torch.tensor([40000, 3]), -1, shrunk, decode._workspace.host)
    assert PlanRecord(shrunk)["work_capacity"] == 2
