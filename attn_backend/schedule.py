"""Host-side split-KV scheduling for decode: which CTA reads which part of which request.

Decode reads each request's whole KV once, so a work item's cost is about its
number of keys. Requests are cut into chunks (multiples of the kernel's
64-token tile) so that the CTAs come out in near-whole waves over the GPU:
the chunk size minimises the estimated makespan

    waves(c) * (average item length + per-item overhead),  waves = ceil(items * heads / slots)

bounded below by one chunk. Split requests' partial (output, lse) states are
merged afterwards. Items are ordered longest first, so the hardware's
in-order CTA dispatch balances unequal requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE_TOKENS = 64  # the decode kernel's K/V tile
MIN_CHUNK_TOKENS = 64  # one tile; bench/sweep_chunks.py: 1 x 512 runs 1.34x faster at 64 than at 256
ITEM_OVERHEAD_TOKENS = 64  # a CTA's fixed cost (pipeline fill, epilogue), in tokens of streaming
MAX_SPLITS_CONSIDERED = 128


class _WorkList:
    """A schedule's work items (the columns of `items`) and its merge ranges (`merge_indptr`)."""

    items: np.ndarray
    merge_indptr: np.ndarray

    @property
    def num_items(self) -> int:
        return self.items.shape[1]

    @property
    def num_partials(self) -> int:
        return int(self.merge_indptr[-1])


@dataclass(frozen=True)
class DecodeSchedule(_WorkList):
    """Work items (rows of `items`: request, kv_start, kv_end, partial) and the merge ranges."""

    items: np.ndarray  # int32 [4, num_items]
    merge_indptr: np.ndarray  # int32 [batch + 1]; request r merges partials [indptr[r], indptr[r+1])
    chunk_tokens: int


def kv_ranges(kv_lens: np.ndarray, window_left: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the keys a decode query (at position kv_len - 1) can see."""
    ends = kv_lens.astype(np.int64)
    if window_left < 0:
        return np.zeros_like(ends), ends
    return np.maximum(ends - 1 - window_left, 0), ends


def max_items_per_head(batch_size: int, num_kv_heads: int, cta_slots: int) -> int:
    """The most work items per kv head a schedule may use (sizes CUDA-graph grids and buffers)."""
    return 2 * batch_size + 4 * (-(-cta_slots // num_kv_heads))


def choose_chunk(lengths: np.ndarray, num_kv_heads: int, cta_slots: int, max_items: int) -> int:
    """The chunk size (tokens) with the smallest estimated makespan; see the module docstring."""
    longest = int(lengths.max(initial=0))
    if longest <= MIN_CHUNK_TOKENS:
        return max(longest, 1)
    # A chunk c makes at least total / c items, so more than
    # longest * max_items / total splits of the longest request cannot fit:
    # at large batches only a few candidates remain (this runs every step).
    total = int(lengths.sum())
    max_splits = min(MAX_SPLITS_CONSIDERED, longest // MIN_CHUNK_TOKENS,
                     longest * max_items // max(total, 1))
    splits = np.arange(1, max(max_splits, 1) + 1)
    chunks = (longest + splits - 1) // splits
    chunks = np.unique((chunks + TILE_TOKENS - 1) // TILE_TOKENS * TILE_TOKENS)[::-1]
    chunks = chunks[chunks >= MIN_CHUNK_TOKENS]
    if chunks.size == 0 or chunks[0] < longest:
        chunks = np.concatenate([[longest], chunks])
    items = np.maximum(1, (lengths[:, None] + chunks[None, :] - 1) // chunks[None, :]).sum(axis=0)
    feasible = items <= max_items
    feasible[0] = True  # one item per request always fits
    chunks, items = chunks[feasible], items[feasible]
    waves = (items * num_kv_heads + cta_slots - 1) // cta_slots
    average = total / items
    estimate = np.maximum(waves * (average + ITEM_OVERHEAD_TOKENS), chunks + ITEM_OVERHEAD_TOKENS)
    return int(chunks[np.argmin(estimate)])  # argmin takes the first (largest) chunk on ties


def cut_ranges(starts: np.ndarray, ends: np.ndarray, chunk: int):
    """Ranges [start, end) cut into work items of at most `chunk` keys; an empty range still
    gets one item. Returns per item (its range, start, end, index within its range), and the
    items per range."""
    counts = np.maximum(1, -(-(ends - starts) // chunk))
    owner = np.repeat(np.arange(len(starts)), counts)
    first_item = np.repeat(np.cumsum(counts) - counts, counts)
    index_in_range = np.arange(len(owner)) - first_item
    item_start = starts[owner] + index_in_range * chunk
    item_end = np.minimum(item_start + chunk, ends[owner])
    return owner, item_start, item_end, index_in_range, counts


def plan_decode(kv_lens: np.ndarray, *, window_left: int, num_kv_heads: int,
                cta_slots: int) -> DecodeSchedule:
    batch = len(kv_lens)
    starts, ends = kv_ranges(kv_lens, window_left)
    lengths = ends - starts
    chunk = choose_chunk(lengths, num_kv_heads, cta_slots,
                         max_items_per_head(batch, num_kv_heads, cta_slots))
    request, item_start, item_end, index_in_request, counts = cut_ranges(starts, ends, chunk)
    split = counts > 1
    merge_indptr = np.concatenate([[0], np.cumsum(np.where(split, counts, 0))])
    partial = np.where(split[request], merge_indptr[request] + index_in_request, -1)
    order = np.argsort(-(item_end - item_start), kind="stable")  # longest first
    items = np.stack([request, item_start, item_end, partial])[:, order].astype(np.int32)
    return DecodeSchedule(items, merge_indptr.astype(np.int32), chunk)


def graph_grid_size(batch_size: int, num_kv_heads: int, cta_slots: int) -> int:
    """Work-item slots of a CUDA-graph-captured decode: enough for any lengths at this batch."""
    return max_items_per_head(batch_size, num_kv_heads, cta_slots)


# ---- prefill / append ------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillSchedule(_WorkList):
    """Work items (rows of `items`: request, row_start, kv_start, kv_end, partial, merge_group).

    A tile is `tile_rows` packed query rows of one request (row = token * group
    + head in group). A tile whose kv range is split into chunks is a merge
    group: its chunks write partials [merge_indptr[g], merge_indptr[g+1]).
    """

    items: np.ndarray  # int32 [6, num_items]
    merge_indptr: np.ndarray  # int32 [num_groups + 1]
    num_tiles: int


def max_prefill_partials_per_head(num_kv_heads: int, cta_slots: int) -> int:
    """Partial slots per kv head: split-KV only fills the GPU, so about two waves' worth."""
    return 2 * (-(-cta_slots // num_kv_heads))


def max_prefill_tiles(num_tokens: int, batch_size: int, group_size: int, tile_rows: int) -> int:
    """An upper bound on the tiles of any batch of `batch_size` requests and `num_tokens` queries."""
    return -(-num_tokens * group_size // tile_rows) + batch_size


def prefill_grid_size(num_tokens: int, batch_size: int, group_size: int, tile_rows: int,
                      num_kv_heads: int, cta_slots: int) -> int:
    """Work-item slots that any schedule of such a batch fits (sizes CUDA-graph grids)."""
    return max_prefill_tiles(num_tokens, batch_size, group_size, tile_rows) + \
        max_prefill_partials_per_head(num_kv_heads, cta_slots)


def prefill_tile_ranges(q_lens: np.ndarray, kv_lens: np.ndarray, *, group_size: int,
                        tile_rows: int, causal: bool, window_left: int, has_mask: bool):
    """Every tile's (request, row_start, kv_start, kv_end): the keys some row of it can see."""
    q_lens = q_lens.astype(np.int64)
    kv_lens = kv_lens.astype(np.int64)
    tiles = -(-q_lens * group_size // tile_rows)
    request = np.repeat(np.arange(len(q_lens)), tiles)
    first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
    row_start = (np.arange(len(request)) - first_tile) * tile_rows
    q_len, kv_len = q_lens[request], kv_lens[request]
    first_token = row_start // group_size
    last_token = np.minimum(q_len - 1, (row_start + tile_rows - 1) // group_size)
    offset = kv_len - q_len  # query i sits at position offset + i
    kv_end = offset + last_token + 1 if causal and not has_mask else kv_len
    kv_start = np.maximum(offset + first_token - window_left, 0) if window_left >= 0 \
        else np.zeros_like(kv_len)
    return request, row_start, kv_start, np.asarray(kv_end, dtype=np.int64)


def plan_prefill(q_lens: np.ndarray, kv_lens: np.ndarray, *, group_size: int, tile_rows: int,
                 causal: bool, window_left: int, has_mask: bool, num_kv_heads: int,
                 cta_slots: int) -> PrefillSchedule:
    """Tiles of packed query rows, longest kv range first; split-KV when they underfill the GPU."""
    request, row_start, kv_start, kv_end = prefill_tile_ranges(
        q_lens, kv_lens, group_size=group_size, tile_rows=tile_rows, causal=causal,
        window_left=window_left, has_mask=has_mask)
    num_tiles = len(request)
    lengths = kv_end - kv_start
    chunk = max(1, int(lengths.max(initial=0)))  # one item per tile
    if 0 < num_tiles and num_tiles * num_kv_heads < cta_slots:
        # Fewer CTAs than the GPU holds: cut the kv ranges, as decode does.
        chunk = choose_chunk(lengths, num_kv_heads, cta_slots,
                             max_prefill_partials_per_head(num_kv_heads, cta_slots))
    tile, item_start, item_end, index_in_tile, counts = cut_ranges(kv_start, kv_end, chunk)
    split = counts > 1
    group_of_tile = np.cumsum(split) - 1
    merge_indptr = np.concatenate([[0], np.cumsum(counts[split])])
    partial = np.where(split[tile], merge_indptr[group_of_tile[tile]] + index_in_tile, -1)
    merge_group = np.where(split[tile], group_of_tile[tile], -1)
    order = np.argsort(-(item_end - item_start), kind="stable")  # longest first
    items = np.stack([request[tile], row_start[tile], item_start, item_end, partial,
                      merge_group])[:, order].astype(np.int32)
    return PrefillSchedule(items, merge_indptr.astype(np.int32), num_tiles)
