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

from . import reference
from ._plan_run import KernelWrapper, PlanRecord, host_int64
from ._validation import check_run_call
from .kernel_configs import KernelConfig
from .paged_kv import PagedKVCache, PageTable

BACKENDS = ("auto", "split", "full_batch")


@dataclass(frozen=True)
class _PlannedBatch:
    kv_lens: np.ndarray  # int64, host
    window_left: int
    plan: PlanRecord | None  # None: no schedule (the reference path without an extension)
    config: KernelConfig | None  # the configuration the schedule was cut for
    max_kv_len: int  # the longest request's keys (page-table columns run() checks)

    @property
    def num_rows(self) -> int:
        """Query rows run() takes: one per request."""
        return len(self.kv_lens)

    @property
    def num_work_items(self) -> int:
        return self.plan["num_work_items"] if self.plan else 0

    @property
    def full_batch(self) -> bool:
        """Whether the full-batch CTA shape runs this batch."""
        return self.config is not None and self.config.name == "decode_full_batch"


class PagedDecode(KernelWrapper):
    """One query token per request against its paged KV (GQA/MQA/MHA, split-KV)."""

    family = "decode"
    backends = BACKENDS

    def __init__(self, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 head_dim_vo: int | None = None, dtype: torch.dtype,
                 kv_dtype: torch.dtype | None = None, device, max_batch_size: int = 512,
                 use_cuda_graph: bool = False, cta_slots: int | None = None,
                 enable_pdl: bool | None = None, backend: str = "auto"):
        """`dtype`: the query's and the output's; `kv_dtype`: the cache's (default `dtype`).

        `cta_slots`: decode CTAs the GPU runs at once, which sizes split-KV (default:
        measured from each CTA shape's occupancy on `device`; given, it is used for both).

        `enable_pdl`: launch with programmatic dependent launch, so that the kernel starts
        while the kernel before it in the stream finishes (default: on GPUs that have it,
        compute capability 9.0 and newer; FlashInfer's default too).

        `backend`: the CTA shape. "auto": the split shape, and the full-batch shape (d128)
        once a batch's whole requests fill the split shape's CTA slots (the choice depends
        on the batch size only, so a CUDA graph keeps its kernel); "split" or "full_batch":
        that shape for every batch (for tests and benchmarks)."""
        self._init_shape(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, head_dim_vo=head_dim_vo, dtype=dtype,
                         kv_dtype=kv_dtype, device=device, max_batch_size=max_batch_size,
                         use_cuda_graph=use_cuda_graph, enable_pdl=enable_pdl, backend=backend)
        split = self._find_config("decode")
        full = self._find_config("decode_full_batch")
        if backend == "full_batch" and self._ops is not None:
            if full is None:
                raise ValueError(f"backend='full_batch': no full-batch decode shape is compiled "
                                 f"for head dims ({self.head_dim}, {self.head_dim_vo})")
            split, full = full, None
        elif backend == "split":
            full = None
        main, alt = self._with_slots(split, cta_slots), self._with_slots(full, cta_slots)
        self.cta_slots = main[1] if main else 1
        self.full_batch_cta_slots = alt[1] if alt else self.cta_slots
        self._init_plans(main, alt)
        self._planned: _PlannedBatch | None = None

    def plan(self, kv_lens, *, window_left: int = -1) -> None:
        """Schedule a batch from host `kv_lens` (each request's KV length, its new token included).

        `window_left` = w limits each query to the keys [kv_len - 1 - w, kv_len - 1]
        (-1: no window); the schedule skips the keys outside it.
        """
        lens = host_int64(kv_lens)
        batch = len(lens)
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"kv_lens has {batch} requests; accepted: 1..{self.max_batch_size} "
                             "(max_batch_size of this PagedDecode)")
        low, high = int(lens.min()), int(lens.max())
        if low < 0 or high >= 2**31:
            raise ValueError(f"kv_lens must be in [0, 2**31); got [{low}, {high}]")
        plan, config = None, None
        if self._setup is not None:
            plan = PlanRecord(self._ops.plan_decode(torch.from_numpy(lens), int(window_left),
                                                    self._setup.values, self._workspace.host))
            self._workspace.upload()
            config = self._planned_config(plan)
        self._planned = _PlannedBatch(lens, int(window_left), plan, config, high)

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
        self._launch(q, cache, page_table, planned.plan, None, sm_scale, logits_soft_cap, out,
                     lse)
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
