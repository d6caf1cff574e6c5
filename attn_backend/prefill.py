"""Ragged prefill / append over a paged KV cache: `plan()` on the host, `run()` on the device.

    prefill = PagedPrefill(num_qo_heads=32, num_kv_heads=8, head_dim=128,
                           dtype=torch.bfloat16, device="cuda")
    prefill.plan(qo_indptr, kv_lens)            # host lengths -> schedule in fixed buffers
    out = prefill.run(q, cache, page_table)     # no host sync; capturable in a CUDA graph

Request r owns query rows `qo_indptr[r]:qo_indptr[r+1]` of `q`, which are the
last tokens of its `kv_lens[r]` keys (already written to the cache): query i
sits at position kv_len - q_len + i. The same kernel serves a whole prefill
(q_len = kv_len), an extend on a cached prefix, mixed batches, and speculative
verification with a custom mask (SGLang's layout: per request a row-major
[q_len, kv_len] bool block, blocks concatenated or placed at `mask_indptr`).

Every buffer `run()` reads is allocated once in the constructor, so a graph
captured once replays correctly after `plan()` with new lengths. With
`use_cuda_graph=True` the grid depends only on the batch size and the number
of query tokens. CPU tensors run the float reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _extension, reference
from ._validation import check_kernel_shape, check_run_call
from .cuda_graph import FixedCapacityBuffer
from .paged_kv import PagedKVCache, PageTable
from .schedule import max_prefill_partials_per_head, plan_prefill, prefill_grid_size

_SCHEDULE_ROWS = 6  # request, row_start, kv_start, kv_end, partial, merge_group


def allow_hopper_tiles(allowed: bool) -> None:
    """Whether `PagedPrefill` objects built from now on run long queries with the
    warpgroup-MMA (wgmma) kernel on sm_90 GPUs (the default) or with the mma.sync
    kernel that other GPUs run. For tests and benchmarks that compare the two; an
    object planned before a change fails its next run() with a tile-shape error."""
    _extension.load_ops().prefill_allow_wgmma(bool(allowed))


@dataclass(frozen=True)
class _PlannedBatch:
    qo_indptr: np.ndarray  # int64 [batch + 1], host
    kv_lens: np.ndarray  # int64 [batch], host
    causal: bool
    window_left: int
    custom_mask: torch.Tensor | None  # flat bool, as given (the reference path reads it)
    mask_indptr: np.ndarray | None  # int64 [batch + 1] element offsets of each request's block
    num_work_items: int
    tile_rows: int  # the kernel tile shape the schedule was cut for

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def num_rows(self) -> int:
        """Query rows run() takes: every query token."""
        return self.num_tokens


class PagedPrefill:
    """Ragged queries against their requests' paged KV (causal, window, custom masks, split-KV)."""

    def __init__(self, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 head_dim_vo: int | None = None, dtype: torch.dtype, device,
                 max_batch_size: int = 512, max_num_tokens: int = 32768,
                 max_mask_elements: int = 0, use_cuda_graph: bool = False,
                 cta_slots: int | None = None, enable_pdl: bool | None = None):
        """`max_num_tokens`: query tokens per batch the buffers hold. `max_mask_elements`:
        custom-mask elements per batch (needed up front with `use_cuda_graph`; otherwise the
        mask buffer grows on demand). `cta_slots`: prefill CTAs the GPU runs at once, which
        sizes split-KV (default: measured from the kernel's occupancy on `device`).
        `enable_pdl`: programmatic dependent launch, as for PagedDecode (default: on for
        compute capability 9.0 and newer)."""
        head_dim_vo = head_dim if head_dim_vo is None else head_dim_vo
        check_kernel_shape(num_qo_heads, num_kv_heads, head_dim, head_dim_vo, dtype)
        if max_batch_size < 1 or max_num_tokens < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_num_tokens "
                             f"({max_num_tokens}) must be >= 1")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.group_size = num_qo_heads // num_kv_heads
        self.head_dim = head_dim
        self.head_dim_vo = head_dim_vo
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.use_cuda_graph = use_cuda_graph
        self.enable_pdl = _extension.pdl_default(self.device) if enable_pdl is None \
            else bool(enable_pdl)

        # Two tile shapes: `tile_rows` for long queries and `short_tile_rows` for batches
        # whose requests have few query rows (see _tile_shape); buffers fit either.
        if self.device.type == "cuda":
            ops = _extension.load_ops()
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count

            def tile_shape(short_queries: bool) -> tuple[int, int]:
                rows, _, ctas_per_sm, _ = ops.paged_prefill_config(head_dim, head_dim_vo,
                                                                   short_queries)
                return int(rows), (cta_slots if cta_slots is not None else
                                   max(1, ctas_per_sm) * num_sms)

            shapes = (tile_shape(False), tile_shape(True))
        else:  # the reference ignores the schedule; plan() still makes one
            slots = cta_slots if cta_slots is not None else 1
            shapes = ((128, slots), (64, slots))
        (self.tile_rows, self.cta_slots), (self.short_tile_rows, self.short_cta_slots) = shapes
        self.max_partials = max(max_prefill_partials_per_head(num_kv_heads, slots)
                                for _, slots in shapes)
        self.capacity = max(prefill_grid_size(max_num_tokens, max_batch_size, self.group_size,
                                              rows, num_kv_heads, slots) for rows, slots in shapes)
        partial_rows = self.max_partials * num_kv_heads * max(self.tile_rows,
                                                              self.short_tile_rows)
        if self.capacity > 65535:
            raise ValueError(f"max_num_tokens={max_num_tokens} makes up to {self.capacity} work "
                             "items; the kernel's grid takes at most 65535 (lower max_num_tokens)")
        self._request_info = FixedCapacityBuffer("prefill request info", 3 * max_batch_size,
                                                 torch.int32, self.device)
        self._schedule = FixedCapacityBuffer("prefill schedule", _SCHEDULE_ROWS * self.capacity,
                                             torch.int32, self.device)
        self._merge_indptr = FixedCapacityBuffer("prefill merge_indptr", self.max_partials + 1,
                                                 torch.int32, self.device)
        self._mask_offsets = FixedCapacityBuffer("prefill mask offsets", max_batch_size + 1,
                                                 torch.int64, self.device)
        self._mask_bits = torch.zeros(-(-max_mask_elements // 8), dtype=torch.uint8,
                                      device=self.device)
        self._mask_bit_weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8,
                                              device=self.device)
        self._partial_out = torch.empty(partial_rows, head_dim_vo, dtype=torch.float32,
                                        device=self.device)
        self._partial_lse = torch.empty(partial_rows, dtype=torch.float32, device=self.device)
        # Zeros between launches; the kernel's merging CTA resets what it counted.
        self._merge_counters = torch.zeros(self.max_partials * num_kv_heads, dtype=torch.int32,
                                           device=self.device)
        self._host_info = np.empty((3, max_batch_size), dtype=np.int32)
        self._host_schedule = np.empty((_SCHEDULE_ROWS, self.capacity), dtype=np.int32)
        self._planned: _PlannedBatch | None = None

    def plan(self, qo_indptr, kv_lens, *, causal: bool = True, window_left: int = -1,
             custom_mask: torch.Tensor | None = None, mask_indptr=None,
             graph_num_tokens: int | None = None) -> None:
        """Schedule a batch from host `qo_indptr` [batch + 1] and `kv_lens` [batch].

        `window_left` = w: a query at position p sees keys [p - w, ...] only (-1: no window).
        `custom_mask`: flat bool tensor (any device; packed to bits on the kernel's device),
        request r's row-major [q_len, kv_len] block at element `mask_indptr[r]` (default:
        the blocks back to back); it replaces causality, the window still applies.
        `graph_num_tokens` (with `use_cuda_graph`): the query tokens the graph's grid is sized
        for, when a captured batch carries more tokens than its requests use (vLLM pads a
        graph's batch with empty requests and spare tokens); default: qo_indptr[-1].
        """
        qo = _host_int64("qo_indptr", qo_indptr)
        lens = _host_int64("kv_lens", kv_lens)
        batch = len(lens)
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"kv_lens has {batch} requests; accepted: 1..{self.max_batch_size} "
                             "(max_batch_size of this PagedPrefill)")
        if len(qo) != batch + 1 or qo[0] != 0 or np.any(np.diff(qo) < 0):
            raise ValueError(f"qo_indptr must be {batch + 1} non-decreasing offsets from 0 "
                             f"(one more than kv_lens); got {qo.tolist()[:8]}...")
        q_lens = np.diff(qo)
        if qo[-1] > self.max_num_tokens:
            raise ValueError(f"the batch has {qo[-1]} query tokens; this PagedPrefill holds "
                             f"max_num_tokens={self.max_num_tokens}")
        if lens.max() >= 2**31:
            raise ValueError(f"kv_lens must be < 2**31; got {lens.max()}")
        short = np.flatnonzero(lens < q_lens)
        if short.size and (causal or window_left >= 0 or custom_mask is not None):
            r = int(short[0])
            raise ValueError(f"request {r}: kv_len {lens[r]} < q_len {q_lens[r]}; with causal, "
                             "a window or a mask the queries must be the last kv_len tokens")
        mask, offsets = None, None
        if custom_mask is not None:
            mask, offsets = self._check_mask(custom_mask, mask_indptr, q_lens, lens)
        grid_tokens = int(qo[-1]) if graph_num_tokens is None else graph_num_tokens
        if not qo[-1] <= grid_tokens <= self.max_num_tokens:
            raise ValueError(f"graph_num_tokens={graph_num_tokens}; accepted: from the batch's "
                             f"{qo[-1]} tokens to max_num_tokens={self.max_num_tokens}")
        tile_rows, cta_slots = self._tile_shape(q_lens, grid_tokens)
        schedule = plan_prefill(q_lens, lens, group_size=self.group_size,
                                tile_rows=tile_rows, causal=causal, window_left=window_left,
                                has_mask=mask is not None, num_kv_heads=self.num_kv_heads,
                                cta_slots=cta_slots)
        num_work_items = prefill_grid_size(grid_tokens, batch, self.group_size, tile_rows,
                                           self.num_kv_heads, cta_slots) \
            if self.use_cuda_graph else schedule.num_items
        if not schedule.num_items <= num_work_items <= self.capacity:
            raise RuntimeError(f"prefill schedule of {schedule.num_items} items does not fit its "
                               f"grid of {num_work_items} (capacity {self.capacity})")
        if schedule.num_partials > self.max_partials:
            raise RuntimeError(f"prefill schedule needs {schedule.num_partials} partials; "
                               f"capacity {self.max_partials}")
        self._host_info[0, :batch] = qo[:-1]
        self._host_info[1, :batch] = q_lens
        self._host_info[2, :batch] = lens
        self._request_info.load(torch.from_numpy(self._host_info.reshape(-1)))
        self._host_schedule[0] = -1  # unused slots of a graph-sized grid: no request
        self._host_schedule[1:4] = 0
        self._host_schedule[4:] = -1
        self._host_schedule[:, : schedule.num_items] = schedule.items
        self._schedule.load(torch.from_numpy(self._host_schedule.reshape(-1)))
        self._merge_indptr.load(torch.from_numpy(schedule.merge_indptr))
        if mask is not None and self.device.type == "cuda":
            # Only the blocks the lengths use: SGLang's graph runners hand over a
            # larger static mask buffer.
            self._pack_mask(mask[: int(offsets[-1])])
            self._mask_offsets.load(torch.from_numpy(offsets[:-1]))
        self._planned = _PlannedBatch(qo, lens, causal, window_left, mask, offsets,
                                      num_work_items, tile_rows)

    def _tile_shape(self, q_lens: np.ndarray, grid_tokens: int) -> tuple[int, int]:
        """(tile rows, CTA slots) for a batch. A tile never spans requests, so requests of at
        most `short_tile_rows` query rows (speculative verification, short extends) take the
        short tiles; longer ones the large tiles, which read each K/V tile for more rows.

        With `use_cuda_graph` a captured launch keeps the kernel it was captured with, so the
        choice depends only on what is fixed per graph (its tokens and batch size): the mean
        query length. Either shape computes any batch correctly."""
        if self.use_cuda_graph:
            rows_per_request = -(-grid_tokens // len(q_lens)) * self.group_size
        else:
            rows_per_request = int(q_lens.max(initial=0)) * self.group_size
        if rows_per_request <= self.short_tile_rows:
            return self.short_tile_rows, self.short_cta_slots
        return self.tile_rows, self.cta_slots

    def _check_mask(self, custom_mask, mask_indptr, q_lens, kv_lens):
        if not isinstance(custom_mask, torch.Tensor) or custom_mask.dtype not in (torch.bool,
                                                                                   torch.uint8):
            raise TypeError("custom_mask must be a bool (or 0/1 uint8) tensor")
        mask = custom_mask.reshape(-1)
        sizes = q_lens * kv_lens
        if mask_indptr is None:
            offsets = np.concatenate([[0], np.cumsum(sizes)])
        else:
            offsets = _host_int64("mask_indptr", mask_indptr)
            if len(offsets) != len(kv_lens) + 1:
                raise ValueError(f"mask_indptr has {len(offsets)} entries; expected "
                                 f"{len(kv_lens) + 1} (batch + 1)")
            if np.any(offsets[:-1] + sizes > offsets[1:]) or offsets[0] < 0:
                raise ValueError("mask_indptr: request r's block (q_len * kv_len elements) must "
                                 "fit between mask_indptr[r] and mask_indptr[r + 1]")
        if mask.numel() < offsets[-1]:
            raise ValueError(f"custom_mask has {mask.numel()} elements; the lengths need "
                             f"{int(offsets[-1])} (sum of q_len * kv_len)")
        if self.device.type == "cuda" and self.use_cuda_graph and \
                -(-mask.numel() // 8) > self._mask_bits.numel():
            raise ValueError(f"custom_mask has {mask.numel()} elements; this graph-mode "
                             f"PagedPrefill holds max_mask_elements={self._mask_bits.numel() * 8}")
        return mask, offsets

    def _pack_mask(self, mask: torch.Tensor) -> None:
        """Bit i of the packed mask (byte i // 8, bit i % 8) = element i; runs on the device."""
        mask = mask.to(device=self.device, dtype=torch.uint8)
        num_bytes = -(-mask.numel() // 8)
        if num_bytes > self._mask_bits.numel():  # eager mode only (checked in plan)
            self._mask_bits = torch.zeros(num_bytes, dtype=torch.uint8, device=self.device)
        padded = torch.nn.functional.pad(mask, (0, num_bytes * 8 - mask.numel()))
        torch.sum(padded.view(num_bytes, 8) * self._mask_bit_weights, dim=1, dtype=torch.uint8,
                  out=self._mask_bits[:num_bytes])

    def run(self, q: torch.Tensor, cache: PagedKVCache, page_table: PageTable, *,
            sm_scale: float | None = None, logits_soft_cap: float = 0.0,
            out: torch.Tensor | None = None, return_lse: bool = False):
        """Attention of `q` [num_tokens, num_qo_heads, head_dim] over the planned batch's KV.

        Returns `out` [num_tokens, num_qo_heads, head_dim_vo], or (out, lse) with
        `return_lse` (lse: float32 natural log, [num_tokens, num_qo_heads]).
        """
        sm_scale = check_run_call(self, q, cache, page_table,
                                  rows_what="the query tokens given to plan() (qo_indptr[-1])",
                                  out=out, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)
        planned = self._planned
        if q.device.type != "cuda":
            return self._run_reference(q, cache, page_table, sm_scale, logits_soft_cap, out,
                                       return_lse)
        if out is None:
            out = torch.empty(q.shape[0], self.num_qo_heads, self.head_dim_vo, dtype=q.dtype,
                              device=q.device)
        lse = torch.empty(q.shape[0], self.num_qo_heads, dtype=torch.float32, device=q.device) \
            if return_lse else None
        has_mask = planned.custom_mask is not None
        _extension.load_ops().paged_prefill(
            q, cache.k, cache.v, page_table.table, page_table.row_index, page_table.slot_map,
            page_table.holds_token_slots, self._request_info.tensor.view(3, self.max_batch_size),
            self._schedule.tensor.view(_SCHEDULE_ROWS, self.capacity), planned.num_work_items,
            planned.tile_rows, self._mask_bits if has_mask else None,
            self._mask_offsets.tensor if has_mask else None, self._merge_indptr.tensor,
            self._merge_counters, self._partial_out, self._partial_lse, float(sm_scale),
            float(logits_soft_cap), int(planned.window_left), bool(planned.causal),
            self.enable_pdl, out, lse)
        return (out, lse) if return_lse else out

    def _run_reference(self, q, cache, page_table, sm_scale, logits_soft_cap, out, return_lse):
        planned = self._planned
        batch = len(planned.kv_lens)
        kv_indptr, kv_slots = page_table.token_slots(batch, planned.kv_lens.tolist(),
                                                     cache.page_size)
        result = reference.attention(
            q, planned.qo_indptr.tolist(), cache, kv_indptr, kv_slots, sm_scale=sm_scale,
            causal=planned.causal, window_left=planned.window_left,
            logits_soft_cap=logits_soft_cap, custom_mask=planned.custom_mask,
            mask_indptr=None if planned.mask_indptr is None else planned.mask_indptr.tolist())
        computed = result.out.to(q.dtype)
        if out is not None:
            out.copy_(computed)
            computed = out
        return (computed, result.lse) if return_lse else computed


def _host_int64(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.tolist()  # a device tensor syncs here; callers pass host lengths
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be non-negative; got min {array.min()}")
    return array
