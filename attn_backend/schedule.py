"""The planner's specification, in numpy: which CTA computes which rows of which request over
which keys.

`plan()` runs the C++ planner (kernels/include/attn_backend/scheduler.h) in the extension;
this module states the same schedules in array form and the tests compare the two item for
item. Neither holds a tile fact: the rows and keys per tile (`TileShape`) and the CTA slots
come from the kernel configuration planned for (`attn_backend.kernel_configs`).

A tile is `rows` packed query rows (token * group + head in group) of one request; its keys
are the ones some row of it can see. When the tiles underfill the GPU the plan cuts their
key ranges into chunks, whole K/V tiles each, so that the CTAs come out in near-whole waves:
the chunk minimises the estimated makespan

    waves(c) * (average item length + per-item overhead),  waves = ceil(CTAs(c) / slots)

bounded below by one chunk. A split tile is a merge group: its chunks write partial states
[merge_indptr[g], merge_indptr[g + 1]) that its last chunk merges in the same launch. Items
are ordered longest first, so the hardware's in-order CTA dispatch balances unequal work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ITEM_OVERHEAD_TOKENS = 64  # a CTA's fixed cost (pipeline fill, epilogue), in keys of streaming
MAX_SPLITS_CONSIDERED = 128

# Rows of a work list, in order.
WORK_LIST_ROWS = ("request", "row_start", "kv_start", "kv_end", "partial", "merge_group")


@dataclass(frozen=True)
class TileShape:
    """A kernel configuration's tile facts."""

    rows: int  # packed query rows per tile
    kv_tokens: int  # keys per K/V tile: the chunk granularity and the smallest chunk
    # A split tile's partial state in keys of streaming, where the split's own cost enters
    # the chunk choice (0: it does not; see choose_chunk).
    partial_tokens: int = 0


def tile_shape(config) -> TileShape:
    """A kernel configuration's TileShape, as the C++ planner builds it (plan_ops.cpp)."""
    return TileShape(config.tile_rows, config.kv_tile_tokens, config.partial_tokens)


@dataclass(frozen=True)
class WorkSchedule:
    """Work items (columns of `items`, rows as WORK_LIST_ROWS) and the split tiles' partials."""

    items: np.ndarray  # int32 [6, num_items]
    merge_indptr: np.ndarray  # int32 [num_merge_groups + 1]
    chunk_tokens: int
    num_tiles: int

    @property
    def num_items(self) -> int:
        return self.items.shape[1]

    @property
    def num_partials(self) -> int:
        return int(self.merge_indptr[-1])

    @property
    def num_merge_groups(self) -> int:
        return len(self.merge_indptr) - 1


def choose_chunk(lengths: np.ndarray, ctas_per_chunk: int, cta_slots: int, max_chunks: int,
                 tile_tokens: int, partial_tokens: int = 0) -> int:
    """The chunk (keys) with the smallest estimated makespan; see the module docstring. With
    partial_tokens > 0 a split also costs its partials: one written per chunk, and the longest
    range's merge of its own at 2/5 of that each (scheduler.h says why)."""
    longest = int(lengths.max(initial=0))
    if longest <= tile_tokens:
        return max(longest, 1)
    # A chunk c makes at least total / c items, so more than longest * max_chunks / total
    # splits of the longest length cannot fit: at large batches few candidates remain.
    total = int(lengths.sum())
    max_splits = min(MAX_SPLITS_CONSIDERED, longest // tile_tokens,
                     longest * max_chunks // max(total, 1))
    splits = np.arange(1, max(max_splits, 1) + 1)
    chunks = (longest + splits - 1) // splits
    chunks = np.unique((chunks + tile_tokens - 1) // tile_tokens * tile_tokens)[::-1]
    chunks = chunks[chunks >= tile_tokens]
    if chunks.size == 0 or chunks[0] < longest:
        chunks = np.concatenate([[longest], chunks])
    items = np.maximum(1, (lengths[:, None] + chunks[None, :] - 1) // chunks[None, :]).sum(axis=0)
    feasible = items <= max_chunks
    feasible[0] = True  # one item per length always fits
    chunks, items = chunks[feasible], items[feasible]
    waves = (items * ctas_per_chunk + cta_slots - 1) // cta_slots
    average = total / items
    splits = (longest + chunks - 1) // chunks
    write = np.where(splits > 1, partial_tokens, 0)
    merge = np.where(splits > 1, 2 * partial_tokens * splits // 5, 0)
    estimate = np.maximum(waves * (average + ITEM_OVERHEAD_TOKENS + write),
                          chunks + ITEM_OVERHEAD_TOKENS + write) + merge
    return int(chunks[np.argmin(estimate)])  # argmin takes the first (largest) chunk on ties


# ---- capacities: what any batch of a given size can need (sizes buffers and graph grids) ----

def decode_row_tiles(group_size: int, tile_rows: int) -> int:
    """Row tiles of one decode request: its group's heads in tiles of `tile_rows`."""
    return -(-group_size // tile_rows)


def max_decode_chunks(batch_size: int, num_kv_heads: int, row_tiles: int, cta_slots: int) -> int:
    """Chunks a decode schedule may cut: two per request plus four waves' worth."""
    return 2 * batch_size + 4 * (-(-cta_slots // (num_kv_heads * row_tiles)))


def max_decode_items(batch_size: int, num_kv_heads: int, group_size: int, shape: TileShape,
                     cta_slots: int) -> int:
    """Work items any decode batch of `batch_size` can need (the grid of a CUDA graph)."""
    row_tiles = decode_row_tiles(group_size, shape.rows)
    return max_decode_chunks(batch_size, num_kv_heads, row_tiles, cta_slots) * row_tiles


def max_prefill_partials(num_kv_heads: int, cta_slots: int) -> int:
    """Partial states per kv head: split-KV only fills the GPU, so about two waves' worth."""
    return 2 * (-(-cta_slots // num_kv_heads))


def max_prefill_tiles(num_tokens: int, batch_size: int, group_size: int, shape: TileShape) -> int:
    """An upper bound on the tiles of any batch of `batch_size` requests and `num_tokens` queries."""
    return -(-num_tokens * group_size // shape.rows) + batch_size


def prefill_grid_size(num_tokens: int, batch_size: int, group_size: int, shape: TileShape,
                      num_kv_heads: int, cta_slots: int) -> int:
    """Work items any such batch can need (the grid of a CUDA graph)."""
    return max_prefill_tiles(num_tokens, batch_size, group_size, shape) + \
        max_prefill_partials(num_kv_heads, cta_slots)


# ---- schedules ---------------------------------------------------------------------------

def schedule_ranges(request: np.ndarray, row_start: np.ndarray, kv_start: np.ndarray,
                    kv_end: np.ndarray, *, row_tiles: int, tile_rows: int,
                    chunk: int) -> WorkSchedule:
    """Key ranges [kv_start, kv_end) that `row_tiles` consecutive row tiles of a request share
    (from packed row `row_start`), cut into chunks of at most `chunk` keys (an empty range
    still gets one): one item per chunk and row tile, longest first (equal lengths in range
    order), the row tiles of a chunk adjacent. Each row tile of a split range is a merge
    group, in range order."""
    lengths = kv_end - kv_start
    counts = np.maximum(1, -(-lengths // chunk))
    owner = np.repeat(np.arange(len(counts)), counts)
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)
    index = np.arange(len(owner)) - first_piece
    piece_start = kv_start[owner] + index * chunk
    piece_end = np.minimum(piece_start + chunk, kv_end[owner])
    order = np.argsort(-(piece_end - piece_start), kind="stable")  # longest first
    owner, index, piece_start, piece_end = (a[order] for a in (owner, index, piece_start,
                                                               piece_end))
    split = counts > 1
    first_group = np.where(split, (np.cumsum(split) - 1) * row_tiles, -1)
    group_counts = np.repeat(counts[split], row_tiles)
    merge_indptr = np.concatenate([[0], np.cumsum(group_counts)])
    tile = np.tile(np.arange(row_tiles), len(owner))
    owner, index, piece_start, piece_end = (np.repeat(a, row_tiles) for a in (owner, index,
                                                                               piece_start,
                                                                               piece_end))
    group = np.where(split[owner], first_group[owner] + tile, -1)
    partial = np.where(group >= 0, merge_indptr[np.maximum(group, 0)] + index, -1)
    items = np.stack([request[owner], row_start[owner] + tile * tile_rows, piece_start,
                      piece_end, partial, group]).astype(np.int32)
    return WorkSchedule(items, merge_indptr.astype(np.int32), chunk, len(counts) * row_tiles)


def kv_ranges(kv_lens: np.ndarray, window_left: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the keys a decode query (at position kv_len - 1) can see."""
    ends = kv_lens.astype(np.int64)
    if window_left < 0:
        return np.zeros_like(ends), ends
    return np.maximum(ends - 1 - window_left, 0), ends


def plan_decode(kv_lens: np.ndarray, *, window_left: int, num_kv_heads: int, group_size: int,
                shape: TileShape, cta_slots: int) -> WorkSchedule:
    """One query per request over the keys it sees; its group's heads in row tiles."""
    batch = len(kv_lens)
    starts, ends = kv_ranges(np.asarray(kv_lens), window_left)
    row_tiles = decode_row_tiles(group_size, shape.rows)
    chunk = choose_chunk(ends - starts, num_kv_heads * row_tiles, cta_slots,
                         max_decode_chunks(batch, num_kv_heads, row_tiles, cta_slots),
                         shape.kv_tokens, shape.partial_tokens)
    return schedule_ranges(np.arange(batch), np.zeros(batch, dtype=np.int64), starts, ends,
                           row_tiles=row_tiles, tile_rows=shape.rows, chunk=chunk)


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


def plan_prefill(q_lens: np.ndarray, kv_lens: np.ndarray, *, group_size: int, shape: TileShape,
                 causal: bool, window_left: int, has_mask: bool, num_kv_heads: int,
                 cta_slots: int) -> WorkSchedule:
    """Tiles of packed query rows, longest kv range first; split-KV when they underfill the GPU."""
    request, row_start, kv_start, kv_end = prefill_tile_ranges(
        q_lens, kv_lens, group_size=group_size, tile_rows=shape.rows, causal=causal,
        window_left=window_left, has_mask=has_mask)
    num_tiles = len(request)
    lengths = kv_end - kv_start
    chunk = max(1, int(lengths.max(initial=0)))  # one item per tile
    if 0 < num_tiles and num_tiles * num_kv_heads < cta_slots:
        # Fewer CTAs than the GPU holds: cut the kv ranges, as decode does.
        chunk = choose_chunk(lengths, num_kv_heads, cta_slots,
                             max_prefill_partials(num_kv_heads, cta_slots), shape.kv_tokens,
                             shape.partial_tokens)
    return schedule_ranges(request, row_start, kv_start, kv_end, row_tiles=1,
                           tile_rows=shape.rows, chunk=chunk)


def choose_prefill_shape(q_lens: np.ndarray, *, group_size: int, short_rows: int | None,
                         graph_num_tokens: int | None, narrow_rows: int | None = None) -> str:
    """Which tiles a prefill batch takes, "narrow", "short" or "long": a tile never spans
    requests, so requests of at most `narrow_rows` packed rows take the narrow tiles (d128's
    key-split ones, MLA's 16-row mma.sync ones), those of at most `short_rows` the short ones (with CUDA graphs: the rows per request
    of the captured tokens, fixed per graph); the others take the long-query tiles, which read
    each K/V tile for more rows. None: the wrapper has no such configuration."""
    if graph_num_tokens is not None:
        rows_per_request = -(-graph_num_tokens // len(q_lens)) * group_size
    else:
        rows_per_request = int(q_lens.max(initial=0)) * group_size
    if narrow_rows is not None and rows_per_request <= narrow_rows:
        return "narrow"
    if short_rows is not None and rows_per_request <= short_rows:
        return "short"
    return "long"
