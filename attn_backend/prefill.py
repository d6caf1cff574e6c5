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

from . import fp8, reference
from ._plan_run import KernelWrapper, PlanRecord, host_int64
from ._validation import MLA_HEAD_DIMS, check_run_call
from .kernel_configs import KernelConfig
from .paged_kv import PagedKVCache, PageTable

BACKENDS = ("auto", "mma", "wgmma", "seesaw")


@dataclass(frozen=True)
class _PlannedBatch:
    qo_indptr: np.ndarray  # int64 [batch + 1], host
    kv_lens: np.ndarray  # int64 [batch], host
    causal: bool
    window_left: int
    custom_mask: torch.Tensor | None  # flat bool, as given (the reference path reads it)
    mask_indptr: np.ndarray | None  # int64 [batch + 1] element offsets of each request's block
    plan: PlanRecord | None  # None: no schedule (the reference path without an extension)
    config: KernelConfig | None  # the configuration the schedule was cut for
    max_kv_len: int  # the longest request's keys (page-table columns run() checks)

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def num_rows(self) -> int:
        """Query rows run() takes: every query token."""
        return self.num_tokens

    @property
    def num_work_items(self) -> int:
        return self.plan["num_work_items"] if self.plan else 0

    @property
    def tile_rows(self) -> int | None:
        """Packed query rows per tile of the configuration planned for."""
        return self.config.tile_rows if self.config else None


class PagedPrefill(KernelWrapper):
    """Ragged queries against their requests' paged KV (causal, window, custom masks, split-KV)."""

    family = "prefill"
    backends = BACKENDS
    serves_mla = True

    def __init__(self, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 head_dim_vo: int | None = None, dtype: torch.dtype,
                 kv_dtype: torch.dtype | None = None, device, max_batch_size: int = 512,
                 max_num_tokens: int = 32768, max_mask_elements: int = 0,
                 use_cuda_graph: bool = False, cta_slots: int | None = None,
                 enable_pdl: bool | None = None, backend: str = "auto"):
        """`dtype`: the query's and the output's; `kv_dtype`: the cache's (default `dtype`).
        `max_num_tokens`: query tokens per batch the buffers hold. `max_mask_elements`:
        custom-mask elements per batch (needed up front with `use_cuda_graph`; otherwise the
        mask buffer grows on demand). `cta_slots`: prefill CTAs the GPU runs at once, which
        sizes split-KV (default: measured from each tile shape's occupancy on `device`).
        `enable_pdl`: programmatic dependent launch, as for PagedDecode (default: on for
        compute capability 9.0 and newer).

        `backend`: the kernel for long queries: "wgmma" (Hopper's warpgroup MMAs: sm_90 GPUs
        with an sm_90a build), "mma" (mma.sync, any GPU from sm_80), or "auto" (wgmma where
        it runs and is compiled for these head dims, else mma). Requests of at most one
        short tile of query rows (speculative verify, short extends) take the short-query
        kernel either way. MLA's latent rows (576 / 512): "wgmma" runs every request on the
        64-row warpgroup kernel of 32-key tiles, "seesaw" on the 64-row warpgroup kernel of
        64-key tiles whose warpgroups take alternate tiles (16-bit caches; mla_seesaw.cuh),
        "mma" on the mma.sync ones (16-row tiles for requests of up to 16 rows, 32-row tiles
        otherwise), "auto" by rows per request where the warpgroup kernels run: at most 16 on
        the 16-row mma.sync kernel, at most 64 on the 32-key warpgroup one, more on the
        seesaw one (16-bit caches; FP8 ones stay on the 32-key kernel). "seesaw" is for MLA's
        head dims only."""
        if max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
        self._init_shape(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, head_dim_vo=head_dim_vo, dtype=dtype,
                         kv_dtype=kv_dtype, device=device, max_batch_size=max_batch_size,
                         use_cuda_graph=use_cuda_graph, enable_pdl=enable_pdl, backend=backend)
        self.max_num_tokens = max_num_tokens
        if self._is_mla:
            long, short, narrow = self._mla_configs(backend)
        elif backend == "seesaw":
            raise ValueError(f"backend='seesaw' is MLA's latent kernel (head dims "
                             f"{MLA_HEAD_DIMS}); head dims ({self.head_dim}, {self.head_dim_vo}) "
                             f"take 'auto', 'mma' or 'wgmma'")
        else:
            long, short = self._long_config(backend), self._find_config("prefill_short")
            # d128: the key-split tiles (16 rows that every warp holds, each computing its own
            # keys of every K/V tile as decode does), for requests of at most 16 rows.
            narrow = self._find_config("prefill_short_keysplit")
        main, alt = self._with_slots(long, cta_slots), self._with_slots(short, cta_slots)
        narrow_slots = self._with_slots(narrow, cta_slots)
        self.tile_rows, self.cta_slots = (long.tile_rows, main[1]) if long else (None, 1)
        self.short_tile_rows, self.short_cta_slots = (short.tile_rows, alt[1]) if short \
            else (None, 1)
        # Batches whose requests have at most narrow_tile_rows rows take the narrow tiles, then
        # those of at most short_tile_rows the short ones (None: no such configuration).
        self.narrow_tile_rows, self.narrow_cta_slots = (narrow.tile_rows, narrow_slots[1]) \
            if narrow else (None, 1)
        self._init_plans(main, alt, max_num_tokens, narrow=narrow_slots)
        self._mask_bits = torch.zeros(-(-max_mask_elements // 8), dtype=torch.uint8,
                                      device=self.device)
        self._mask_bit_weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8,
                                              device=self.device)
        self._planned: _PlannedBatch | None = None

    @property
    def _is_mla(self) -> bool:
        return (self.head_dim, self.head_dim_vo) == MLA_HEAD_DIMS

    def _mla_configs(self, backend: str) -> tuple[KernelConfig | None, KernelConfig | None,
                                                  KernelConfig | None]:
        """MLA's (long, short, narrow) configurations. "mma": 32-row mma.sync tiles, and 16-row
        ones for requests of at most 16 rows (a decode of 16 heads); "wgmma" (32-key tiles) or
        "seesaw" (64-key tiles, 16-bit caches): that 64-row warpgroup shape for every request.
        "auto" where wgmma runs, by packed rows per request (bench/results/mla_decode-*, the
        H200): at most 16 on the 16-row mma.sync kernel (the 64-row tiles would idle three
        quarters of their rows), at most 64 (e.g. 16 heads x 4 drafts) on the 32-key warpgroup
        kernel, more (128 heads) on the seesaw one, 3-23% faster there than the 32-key one
        and 4-8% slower at 64 rows of 16 heads; FP8 caches, which the seesaw kernel does not
        read, take the 32-key kernel above 16 rows."""
        mma_16_rows = self._find_config("prefill_mla")
        is_fp8_cache = fp8.is_fp8(self.kv_dtype)
        if backend == "seesaw" and is_fp8_cache:
            raise ValueError(f"backend='seesaw' reads 16-bit latent caches; kv_dtype "
                             f"{self.kv_dtype} takes backend='wgmma', 'mma' or 'auto'")
        if backend in ("wgmma", "seesaw"):
            name = "prefill_mla_seesaw" if backend == "seesaw" else "prefill_mla_wgmma"
            every = self._wgmma_or_mma(name, "prefill_mla_wide", backend)
            return every, every, None
        # "mma", or "auto" where no warpgroup kernel runs: mma.sync's 32-row shape.
        wgmma_32_keys = self._wgmma_or_mma("prefill_mla_wgmma", "prefill_mla_wide", backend)
        if is_fp8_cache or wgmma_32_keys is None or not wgmma_32_keys.wgmma:
            return wgmma_32_keys, mma_16_rows, None
        seesaw = self._wgmma_or_mma("prefill_mla_seesaw", "prefill_mla_wgmma", backend)
        return seesaw, wgmma_32_keys, mma_16_rows

    def _long_config(self, backend: str) -> KernelConfig | None:
        """The long-query configuration of `backend` (None: no schedule on this device)."""
        return self._wgmma_or_mma("prefill_wgmma", "prefill_mma", backend)

    def _wgmma_or_mma(self, wgmma_name: str, mma_name: str, backend: str) -> KernelConfig | None:
        """`backend`'s configuration of the two: "mma", "wgmma" or "seesaw" (the warpgroup one,
        refused where it cannot run), or "auto" (wgmma where it runs, else mma)."""
        mma = self._find_config(mma_name)
        wgmma = self._find_config(wgmma_name)
        on_cuda = self.device.type == "cuda"
        if backend == "mma":
            return mma
        if backend in ("wgmma", "seesaw"):
            if self._ops is not None and (wgmma is None or (on_cuda and not wgmma.runs_here())):
                raise ValueError(
                    f"backend={backend!r} needs an sm_90 GPU, an sm_90a build and head dims "
                    f"with a wgmma kernel; head dims ({self.head_dim}, {self.head_dim_vo}) on "
                    f"{self.device} have none (use backend='mma' or 'auto')")
            return wgmma
        return wgmma if wgmma is not None and on_cuda and wgmma.runs_here() else mma

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
        qo = host_int64(qo_indptr)
        lens = host_int64(kv_lens)
        batch = len(lens)
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"kv_lens has {batch} requests; accepted: 1..{self.max_batch_size} "
                             "(max_batch_size of this PagedPrefill)")
        q_lens = qo[1:] - qo[:-1]
        if len(qo) != batch + 1 or qo[0] != 0 or q_lens.min() < 0:
            raise ValueError(f"qo_indptr must be {batch + 1} non-decreasing offsets from 0 "
                             f"(one more than kv_lens); got {qo.tolist()[:8]}...")
        if qo[-1] > self.max_num_tokens:
            raise ValueError(f"the batch has {qo[-1]} query tokens; this PagedPrefill holds "
                             f"max_num_tokens={self.max_num_tokens}")
        low, high = int(lens.min()), int(lens.max())
        if low < 0 or high >= 2**31:
            raise ValueError(f"kv_lens must be in [0, 2**31); got [{low}, {high}]")
        if causal or window_left >= 0 or custom_mask is not None:
            short = lens < q_lens
            if short.any():
                r = int(short.argmax())
                raise ValueError(f"request {r}: kv_len {lens[r]} < q_len {q_lens[r]}; with "
                                 "causal, a window or a mask the queries must be the last "
                                 "kv_len tokens")
        mask, offsets = None, None
        if custom_mask is not None:
            mask, offsets = self._check_mask(custom_mask, mask_indptr, q_lens, lens)
        grid_tokens = int(qo[-1]) if graph_num_tokens is None else graph_num_tokens
        if not qo[-1] <= grid_tokens <= self.max_num_tokens:
            raise ValueError(f"graph_num_tokens={graph_num_tokens}; accepted: from the batch's "
                             f"{qo[-1]} tokens to max_num_tokens={self.max_num_tokens}")
        plan, config = None, None
        if self._setup is not None:
            given_offsets = None if mask is None or mask_indptr is None else \
                torch.from_numpy(offsets)
            plan = PlanRecord(self._ops.plan_prefill(
                torch.from_numpy(qo), torch.from_numpy(lens), given_offsets, bool(causal),
                int(window_left), mask is not None, grid_tokens, self._setup.values,
                self._workspace.host))
            self._workspace.upload()
            config = self._planned_config(plan)
            if mask is not None and self.device.type == "cuda":
                # Only the blocks the lengths use: SGLang's graph runners hand over a
                # larger static mask buffer.
                self._pack_mask(mask[: int(offsets[-1])])
        self._planned = _PlannedBatch(qo, lens, bool(causal), int(window_left), mask, offsets,
                                      plan, config, high)

    def _check_mask(self, custom_mask, mask_indptr, q_lens, kv_lens):
        if not isinstance(custom_mask, torch.Tensor) or custom_mask.dtype not in (torch.bool,
                                                                                   torch.uint8):
            raise TypeError("custom_mask must be a bool (or 0/1 uint8) tensor")
        mask = custom_mask.reshape(-1)
        sizes = q_lens * kv_lens
        if mask_indptr is None:
            offsets = np.concatenate([[0], np.cumsum(sizes)])
        else:
            offsets = host_int64(mask_indptr)
            if len(offsets) != len(kv_lens) + 1:
                raise ValueError(f"mask_indptr has {len(offsets)} entries; expected "
                                 f"{len(kv_lens) + 1} (batch + 1)")
            if np.any(offsets[:-1] + sizes > offsets[1:]) or offsets[0] < 0:
                raise ValueError("mask_indptr: request r's block (q_len * kv_len elements) must "
                                 "fit between mask_indptr[r] and mask_indptr[r + 1]")
        if mask.numel() < offsets[-1]:
            raise ValueError(f"custom_mask has {mask.numel()} elements; the lengths need "
                             f"{int(offsets[-1])} (sum of q_len * kv_len)")
        # The elements the lengths use (SGLang's graph runners pass a larger static buffer);
        # checked on every device, so a CPU run refuses what the GPU would.
        used = int(offsets[-1])
        if self.use_cuda_graph and -(-used // 8) > self._mask_bits.numel():
            raise ValueError(f"custom_mask: the lengths use {used} elements; this graph-mode "
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
        mask_bits = self._mask_bits if planned.custom_mask is not None else None
        self._launch(q, cache, page_table, planned.plan, mask_bits, sm_scale, logits_soft_cap,
                     out, lse)
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

