"""Batch decode over a paged KV cache: `plan()` on the host, `run()` on the device.

    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128,
                         dtype=torch.bfloat16, device="cuda")
    decode.plan(kv_lens)                       # host lengths -> schedule in fixed buffers
    out = decode.run(q, cache, page_table)     # no host sync; capturable in a CUDA graph

Every buffer `run()` reads is allocated once in the constructor, so a graph
captured once replays correctly after `plan()` is called again with new
lengths. With `use_cuda_graph=True` the grid depends only on the batch size.
CPU tensors run the float reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _extension, reference
from ._validation import check_kernel_shape, check_run_call
from .cuda_graph import FixedCapacityBuffer
from .paged_kv import PagedKVCache, PageTable
from .schedule import graph_grid_size, max_items_per_head, plan_decode



@dataclass(frozen=True)
class _PlannedBatch:
    kv_lens: np.ndarray  # int64, host
    window_left: int
    num_work_items: int
    full_batch: bool  # the kernel's CTA shape for whole requests that fill the GPU

    @property
    def num_rows(self) -> int:
        """Query rows run() takes: one per request."""
        return len(self.kv_lens)


class PagedDecode:
    """One query token per request against its paged KV (GQA/MQA/MHA, split-KV)."""

    def __init__(self, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 head_dim_vo: int | None = None, dtype: torch.dtype, device,
                 max_batch_size: int = 512, use_cuda_graph: bool = False,
                 cta_slots: int | None = None, enable_pdl: bool | None = None):
        """`cta_slots`: decode CTAs the GPU runs at once, which sizes split-KV (default:
        measured from the kernel's occupancy on `device`, for each of its two CTA shapes;
        given, it is used for both).

        `enable_pdl`: launch with programmatic dependent launch, so that the kernel starts
        while the kernel before it in the stream finishes (default: on GPUs that have it,
        compute capability 9.0 and newer; FlashInfer's default too)."""
        head_dim_vo = head_dim if head_dim_vo is None else head_dim_vo
        check_kernel_shape(num_qo_heads, num_kv_heads, head_dim, head_dim_vo, dtype)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.head_dim_vo = head_dim_vo
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch_size = max_batch_size
        self.use_cuda_graph = use_cuda_graph
        self.enable_pdl = _extension.pdl_default(self.device) if enable_pdl is None \
            else bool(enable_pdl)

        # Two CTA shapes (kernels/csrc/paged_decode.cu): the deep one for small batches and
        # split-KV, `cta_slots` of them at once; the full-batch one once the batch's whole
        # requests fill those slots, `full_batch_cta_slots` at once.
        if cta_slots is not None:
            self.cta_slots = self.full_batch_cta_slots = cta_slots
        elif self.device.type == "cuda":
            ops = _extension.load_ops()
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.cta_slots, self.full_batch_cta_slots = (
                max(1, ops.paged_decode_ctas_per_sm(head_dim, head_dim_vo, full_batch)) * num_sms
                for full_batch in (False, True))
        else:
            self.cta_slots = self.full_batch_cta_slots = 1  # the reference ignores the schedule
        self.capacity = max(max_items_per_head(max_batch_size, num_kv_heads, slots)
                            for slots in (self.cta_slots, self.full_batch_cta_slots))
        # The schedule [4, capacity] and merge_indptr [max_batch_size + 1] share one buffer,
        # so a plan is one host-to-device copy (a graph replay plans every step).
        plan_size = 4 * self.capacity + max_batch_size + 1
        self._plan_buffer = FixedCapacityBuffer("decode plan", plan_size, torch.int32,
                                                self.device)
        self._schedule = self._plan_buffer.tensor[: 4 * self.capacity].view(4, self.capacity)
        self._merge_indptr = self._plan_buffer.tensor[4 * self.capacity:]
        self._partial_out = torch.empty(self.capacity, num_qo_heads, head_dim_vo,
                                        dtype=torch.float32, device=self.device)
        self._partial_lse = torch.empty(self.capacity, num_qo_heads, dtype=torch.float32,
                                        device=self.device)
        # Zeros between launches; the kernel's merging CTA resets what it counted.
        self._merge_counters = torch.zeros(max_batch_size * num_kv_heads, dtype=torch.int32,
                                           device=self.device)
        self._host_plan = np.empty(plan_size, dtype=np.int32)
        self._host_schedule = self._host_plan[: 4 * self.capacity].reshape(4, self.capacity)
        self._host_merge_indptr = self._host_plan[4 * self.capacity:]
        # On the GPU the schedule is computed by the extension's C++ planner (a graph replay
        # replans every step); it matches plan_decode(), which the CPU path runs.
        self._native_planner = _extension.load_ops().plan_decode_schedule \
            if self.device.type == "cuda" else None
        self._planned: _PlannedBatch | None = None

    def plan(self, kv_lens, *, window_left: int = -1) -> None:
        """Schedule a batch from host `kv_lens` (each request's KV length, its new token included).

        `window_left` = w limits each query to the keys [kv_len - 1 - w, kv_len - 1]
        (-1: no window); the schedule skips the keys outside it.
        """
        if isinstance(kv_lens, torch.Tensor):
            kv_lens = kv_lens.detach().to("cpu", torch.int64).numpy()
        # A copy: the plan keeps the lengths, and engines reuse their host length buffers.
        lens = np.array(kv_lens, dtype=np.int64).reshape(-1)
        batch = len(lens)
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"kv_lens has {batch} requests; accepted: 1..{self.max_batch_size} "
                             "(max_batch_size of this PagedDecode)")
        if lens.min() < 0 or lens.max() >= 2**31:
            raise ValueError(f"kv_lens must be in [0, 2**31); got [{lens.min()}, {lens.max()}]")
        # The shape depends on the batch size alone, so a graph captured for a batch size
        # keeps a kernel that its replays plan for.
        full_batch = batch * self.num_kv_heads >= self.cta_slots
        cta_slots = self.full_batch_cta_slots if full_batch else self.cta_slots
        grid = graph_grid_size(batch, self.num_kv_heads, cta_slots) \
            if self.use_cuda_graph else -1
        merge_indptr = self._host_merge_indptr[: batch + 1]
        if self._native_planner is not None:
            num_items, _ = self._native_planner(
                torch.from_numpy(lens), window_left, self.num_kv_heads, cta_slots,
                max_items_per_head(batch, self.num_kv_heads, cta_slots), grid,
                torch.from_numpy(self._host_schedule), torch.from_numpy(merge_indptr))
        else:
            schedule = plan_decode(lens, window_left=window_left,
                                   num_kv_heads=self.num_kv_heads, cta_slots=cta_slots)
            num_items = schedule.num_items
            grid_items = grid if grid >= 0 else num_items
            if not num_items <= grid_items <= self.capacity:
                raise RuntimeError(f"decode schedule of {num_items} items does not fit its "
                                   f"grid of {grid_items} (capacity {self.capacity})")
            self._host_schedule[0] = -1  # unused slots of a graph-sized grid: no request
            self._host_schedule[1:3] = 0
            self._host_schedule[3] = -1
            self._host_schedule[:, :num_items] = schedule.items
            merge_indptr[:] = schedule.merge_indptr
        num_work_items = grid if self.use_cuda_graph else num_items
        self._plan_buffer.load(torch.from_numpy(self._host_plan[: 4 * self.capacity + batch + 1]))
        self._planned = _PlannedBatch(lens, window_left, num_work_items, full_batch)

    def run(self, q: torch.Tensor, cache: PagedKVCache, page_table: PageTable, *,
            sm_scale: float | None = None, logits_soft_cap: float = 0.0,
            out: torch.Tensor | None = None, return_lse: bool = False):
        """Attention of `q` [batch, num_qo_heads, head_dim] over the planned batch's KV.

        Returns `out` [batch, num_qo_heads, head_dim_vo], or (out, lse) with
        `return_lse` (lse: float32 natural log, [batch, num_qo_heads]).
        """
        sm_scale = check_run_call(self, q, cache, page_table,
                                  rows_what="the batch size given to plan()", out=out,
                                  sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)
        planned = self._planned
        batch = planned.num_rows
        if q.device.type != "cuda":
            return self._run_reference(q, cache, page_table, sm_scale, logits_soft_cap, out,
                                       return_lse)
        if out is None:
            out = torch.empty(batch, self.num_qo_heads, self.head_dim_vo, dtype=q.dtype,
                              device=q.device)
        lse = torch.empty(batch, self.num_qo_heads, dtype=torch.float32, device=q.device) \
            if return_lse else None
        _extension.load_ops().paged_decode(
            q, cache.k, cache.v, page_table.table, page_table.row_index, page_table.slot_map,
            page_table.holds_token_slots, self._schedule, self._merge_indptr,
            self._merge_counters, planned.num_work_items,
            self._partial_out, self._partial_lse, float(sm_scale), float(logits_soft_cap),
            planned.full_batch, self.enable_pdl, out, lse)
        return (out, lse) if return_lse else out

    def _run_reference(self, q, cache, page_table, sm_scale, logits_soft_cap, out, return_lse):
        planned = self._planned
        batch = len(planned.kv_lens)
        kv_indptr, kv_slots = page_table.token_slots(batch, planned.kv_lens.tolist(),
                                                     cache.page_size)
        # A request without keys (a padding row) has no query in the reference's terms: its
        # row stays 0 with lse -inf, as the kernel writes it.
        has_keys_host = planned.kv_lens > 0
        qo_indptr = np.concatenate([[0], np.cumsum(has_keys_host)]).tolist()
        has_keys = torch.from_numpy(has_keys_host).to(q.device)
        result = reference.attention(q[has_keys], qo_indptr, cache, kv_indptr, kv_slots,
                                     sm_scale=sm_scale, causal=True,
                                     window_left=planned.window_left,
                                     logits_soft_cap=logits_soft_cap)
        decoded = q.new_zeros(batch, self.num_qo_heads, self.head_dim_vo)
        decoded[has_keys] = result.out.to(q.dtype)
        lse = torch.full((batch, self.num_qo_heads), float("-inf"), dtype=result.lse.dtype,
                         device=q.device)
        lse[has_keys] = result.lse
        if out is not None:
            out.copy_(decoded)
            decoded = out
        return (decoded, lse) if return_lse else decoded
