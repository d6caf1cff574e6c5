"""Host-side split-KV scheduling for decode: which CTA reads which part of which request.

Decode reads each request's whole KV once, so the work is proportional to
kv_len. When batch x kv_heads CTAs already fill the GPU, each request is one
work item. Otherwise requests are cut into chunks (multiples of the kernel's
64-token tile) of the smallest size that still fits the work into one wave of
CTAs; the chunks' partial (output, lse) states are merged afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE_TOKENS = 64  # the decode kernel's K/V tile
MIN_CHUNK_TOKENS = 256  # below this the merge costs more than the extra parallelism gains


@dataclass(frozen=True)
class DecodeSchedule:
    """Work items (rows of `items`: request, kv_start, kv_end, partial) and the merge ranges."""

    items: np.ndarray  # int32 [4, num_items]
    merge_indptr: np.ndarray  # int32 [batch + 1]; request r merges partials [indptr[r], indptr[r+1])
    chunk_tokens: int

    @property
    def num_items(self) -> int:
        return self.items.shape[1]

    @property
    def num_partials(self) -> int:
        return int(self.merge_indptr[-1])


def kv_ranges(kv_lens: np.ndarray, window_left: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the keys a decode query (at position kv_len - 1) can see."""
    ends = kv_lens.astype(np.int64)
    if window_left < 0:
        return np.zeros_like(ends), ends
    return np.maximum(ends - 1 - window_left, 0), ends


def items_per_head_target(cta_slots: int, num_kv_heads: int) -> int:
    """Work items per kv head that make one wave of `cta_slots` CTAs."""
    return max(1, cta_slots // num_kv_heads)


def choose_chunk(lengths: np.ndarray, target_items: int) -> int:
    """Smallest tile-multiple chunk (>= MIN_CHUNK_TOKENS) with sum(ceil(len / chunk)) <= target."""
    longest = int(lengths.max(initial=0))
    if len(lengths) >= target_items or longest <= MIN_CHUNK_TOKENS:
        return max(longest, 1)  # no split
    low = MIN_CHUNK_TOKENS // TILE_TOKENS
    high = (longest + TILE_TOKENS - 1) // TILE_TOKENS
    while low < high:  # in units of tiles
        mid = (low + high) // 2
        items = np.maximum(1, -(-lengths // (mid * TILE_TOKENS))).sum()
        if items <= target_items:
            high = mid
        else:
            low = mid + 1
    return low * TILE_TOKENS


def plan_decode(kv_lens: np.ndarray, *, window_left: int, num_kv_heads: int,
                cta_slots: int) -> DecodeSchedule:
    starts, ends = kv_ranges(kv_lens, window_left)
    lengths = ends - starts
    chunk = choose_chunk(lengths, items_per_head_target(cta_slots, num_kv_heads))
    counts = np.maximum(1, -(-lengths // chunk))  # an empty request still gets one item
    batch = len(kv_lens)
    request = np.repeat(np.arange(batch), counts)
    first_item = np.repeat(np.cumsum(counts) - counts, counts)
    index_in_request = np.arange(len(request)) - first_item
    item_start = starts[request] + index_in_request * chunk
    item_end = np.minimum(item_start + chunk, ends[request])
    split = counts > 1
    merge_counts = np.where(split, counts, 0)
    merge_indptr = np.concatenate([[0], np.cumsum(merge_counts)])
    partial = np.where(split[request], merge_indptr[request] + index_in_request, -1)
    items = np.stack([request, item_start, item_end, partial]).astype(np.int32)
    return DecodeSchedule(items, merge_indptr.astype(np.int32), chunk)


def graph_grid_size(batch_size: int, num_kv_heads: int, cta_slots: int) -> int:
    """Work-item slots of a CUDA-graph-captured decode: enough for any lengths at this batch."""
    return batch_size + items_per_head_target(cta_slots, num_kv_heads)
