"""One description of a paged KV cache for both engines.

A `PagedKVCache` holds two 4-D views, K and V, each
`[num_pages, page_size, num_kv_heads, head_dim]` with any strides except a
contiguous last dimension. A token slot is `page * page_size + offset`.

- SGLang keeps per-layer K and V buffers `[num_slots, num_kv_heads, head_dim]`
  addressed by token slots (`req_to_token` rows); `from_sglang` views them as pages.
- vLLM keeps one per-layer tensor `[num_blocks, num_kv_heads, block_size,
  head_dim_k + head_dim_v]` (K and V packed in the last dim; its physical
  stride order depends on the resolved KV layout) addressed by a block table;
  `from_vllm` splits it into the two views without copying.
- MLA keeps one row `[kv_lora_rank + rope_dim]` per token; K is the whole row
  and V its first `kv_lora_rank` columns (`from_mla`).

Kernels and the float reference both take this object, so the addressing is
written once. An FP8 cache (float8 views of the engine's bytes, `attn_backend.fp8`) carries its
K and V scales here too: None (1.0), a float or 0-d tensor, or one per kv head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import fp8
from ._validation import check_tensor


@dataclass(frozen=True)
class PagedKVCache:
    k: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim_k]
    v: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim_v]
    k_scale: float | torch.Tensor | None = None  # FP8 caches: stored = k / k_scale
    v_scale: float | torch.Tensor | None = None

    def __post_init__(self):
        check_tensor("k_cache", self.k, dims=4)
        check_tensor("v_cache", self.v, dims=4)
        if self.k.shape[:3] != self.v.shape[:3]:
            raise ValueError(f"k_cache {tuple(self.k.shape)} and v_cache {tuple(self.v.shape)} must "
                             "agree in pages, page size and kv heads")
        if self.k.dtype != self.v.dtype or self.k.device != self.v.device:
            raise ValueError("k_cache and v_cache must share dtype and device")
        for name, scale in (("k_scale", self.k_scale), ("v_scale", self.v_scale)):
            if scale is None:
                continue
            if not self.is_fp8:
                raise ValueError(f"{name} applies to FP8 caches; this cache is {self.k.dtype}")
            fp8.check_scale_shape(name, scale, self.num_kv_heads)

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim_k(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def is_fp8(self) -> bool:
        return fp8.is_fp8(self.k.dtype)

    def scales_per_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V scales as float32 [num_kv_heads] (1.0 for a 16-bit cache), read once per
        cache object (a device scale synchronises; engines build the object per call, so a
        scale they update is read afresh): for the reference and checks."""
        if "_scales" not in self.__dict__:  # frozen: cached beside the fields
            object.__setattr__(self, "_scales", (
                fp8.scale_per_head("k_scale", self.k_scale, self.num_kv_heads, self.device),
                fp8.scale_per_head("v_scale", self.v_scale, self.num_kv_heads, self.device)))
        return self._scales

    def kernel_tensors(self) -> list[torch.Tensor]:
        """What the attention op reads: [k, v], and for an FP8 cache its K and V scales as
        device tensors after them (fp8.device_scale: read by each launch on the device)."""
        if not self.is_fp8:
            return [self.k, self.v]
        return [self.k, self.v,
                fp8.device_scale("k_scale", self.k_scale, self.num_kv_heads, self.device),
                fp8.device_scale("v_scale", self.v_scale, self.num_kv_heads, self.device)]

    def gather_values(self, slots: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows of `slots` (as gather) as values in `dtype`: dequantised for FP8."""
        k, v = self.gather(slots)
        if not self.is_fp8:
            return k.to(dtype), v.to(dtype)
        k_scale, v_scale = self.scales_per_head()
        return fp8.dequantize(k, k_scale, dtype), fp8.dequantize(v, v_scale, dtype)

    @classmethod
    def from_sglang(cls, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                    page_size: int, *, k_scale=None, v_scale=None) -> "PagedKVCache":
        """Views SGLang's `[num_slots, H, D]` K and V buffers as pages of `page_size` slots."""
        check_tensor("k_buffer", k_buffer, dims=3)
        check_tensor("v_buffer", v_buffer, dims=3)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        num_pages = k_buffer.shape[0] // page_size
        usable = num_pages * page_size  # trailing slots that fill no whole page are unaddressable
        return cls(_as_pages(k_buffer[:usable], num_pages, page_size),
                   _as_pages(v_buffer[:usable], num_pages, page_size), k_scale, v_scale)

    @classmethod
    def from_vllm(cls, kv_cache: torch.Tensor, head_dim_k: int, *, k_scale=None,
                  v_scale=None) -> "PagedKVCache":
        """Splits vLLM's `[num_blocks, H, block_size, Dk + Dv]` tensor (any layout) into K and V."""
        check_tensor("kv_cache", kv_cache, dims=4)
        if not 0 < head_dim_k < kv_cache.shape[3]:
            raise ValueError(f"head_dim_k={head_dim_k} must be in [1, {kv_cache.shape[3] - 1}] "
                             f"for kv_cache of shape {tuple(kv_cache.shape)}")
        pages = kv_cache.transpose(1, 2)  # [num_blocks, block_size, H, Dk + Dv]
        return cls(pages[..., :head_dim_k], pages[..., head_dim_k:], k_scale, v_scale)

    @classmethod
    def from_mla(cls, kv_buffer: torch.Tensor, kv_lora_rank: int, page_size: int, *,
                 scale=None) -> "PagedKVCache":
        """SGLang's MLA buffer `[num_slots, 1, kv_lora_rank + rope_dim]`: K = row, V = latent
        part (the whole row where the model has no rope part). `scale`: an FP8 buffer's one
        scale (stored = value / scale), K's and V's alike since V is a part of the row."""
        check_tensor("kv_buffer", kv_buffer, dims=3)
        if not 0 < kv_lora_rank <= kv_buffer.shape[2]:
            raise ValueError(f"kv_lora_rank={kv_lora_rank} must be in 1..{kv_buffer.shape[2]} "
                             "(the row width)")
        num_pages = kv_buffer.shape[0] // page_size
        pages = _as_pages(kv_buffer[: num_pages * page_size], num_pages, page_size)
        return cls(pages, pages[..., :kv_lora_rank], scale, scale)

    @classmethod
    def from_vllm_mla(cls, kv_cache: torch.Tensor, kv_lora_rank: int, *,
                      scale=None) -> "PagedKVCache":
        """vLLM's MLA cache `[num_blocks, block_size, kv_lora_rank + rope_dim]` (the layer's
        view, its one head squeezed out): K = row, V = latent part; `scale` as for from_mla."""
        check_tensor("kv_cache", kv_cache, dims=3)
        if not 0 < kv_lora_rank <= kv_cache.shape[2]:
            raise ValueError(f"kv_lora_rank={kv_lora_rank} must be in 1..{kv_cache.shape[2]} "
                             "(the row width)")
        pages = kv_cache.unsqueeze(2)
        return cls(pages, pages[..., :kv_lora_rank], scale, scale)

    @classmethod
    def from_token_rows(cls, k: torch.Tensor, v: torch.Tensor) -> "PagedKVCache":
        """K and V rows `[tokens, H, D]` as pages of one token each, so that a
        `PageTable.over_rows` table addresses them where they are (the K/V an engine hands
        over in the call, e.g. MLA's decompressed prefill K/V)."""
        return cls.from_sglang(k, v, 1)

    def page_and_offset(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(device=self.device, dtype=torch.long)
        return slots // self.page_size, slots % self.page_size

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows `[len(slots), H, D]` of the given token slots."""
        page, offset = self.page_and_offset(slots)
        return self.k[page, offset], self.v[page, offset]


def _as_pages(buffer: torch.Tensor, num_pages: int, page_size: int) -> torch.Tensor:
    if buffer.stride(0) != buffer.shape[1] * buffer.stride(1) and buffer.shape[0] > 1:
        raise ValueError("an SGLang KV buffer must have contiguous slots (slot stride = H * "
                         f"head stride); got strides {buffer.stride()}")
    return buffer.view(num_pages, page_size, *buffer.shape[1:])


def slots_from_req_to_token(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                            kv_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang addressing → (kv_indptr [B+1], kv_slots [sum kv_lens]) in CSR form."""
    rows = req_pool_indices.tolist()
    lens = kv_lens.tolist()
    pieces = [req_to_token[row, :n].long() for row, n in zip(rows, lens)]
    return _csr(lens, pieces, req_to_token.device)


def slots_from_block_table(block_table: torch.Tensor, kv_lens: torch.Tensor,
                           page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM addressing → (kv_indptr [B+1], kv_slots): slot = block_table[r, t // bs] * bs + t % bs."""
    lens = kv_lens.tolist()
    table = PageTable.from_block_table(block_table.to(torch.int32))  # vLLM's dtype; any int here
    return table.token_slots(len(lens), lens, page_size)


def _csr(lens: list[int], pieces: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.zeros(len(lens) + 1, dtype=torch.long)
    indptr[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0)
    slots = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long, device=device)
    return indptr.to(device), slots


@dataclass(frozen=True)
class PageTable:
    """Where each request's tokens are, read in place from the engine's table.

    Row `row(r)` = `row_index[r]` (or r when `row_index` is None) of `table`
    describes request r. A vLLM block table holds page ids: token t is on page
    `table[row, t // page_size]`. SGLang's `req_to_token` holds token slots
    (`holds_token_slots`): token t is at slot `table[row, t]`, on page
    slot // page_size, which is exact for any slot layout. Build it with
    `from_block_table` or `from_req_to_token`; kernels read the engine's own
    tensor, so a CUDA graph replay needs no copy. `slot_map` (token slots
    only) redirects each slot read from the table to `slot_map[slot]`: SGLang's
    hybrid sliding-window pools keep window layers in a second pool addressed
    through such a full-to-window map.
    """

    table: torch.Tensor  # int32 [rows, columns], contiguous rows
    holds_token_slots: bool = False
    row_index: torch.Tensor | None = None  # int32/int64 [batch]
    slot_map: torch.Tensor | None = None  # int64 [slots of the table]

    def __post_init__(self):
        check_tensor("page_table", self.table, dims=2, dtypes=(torch.int32,))
        if self.table.shape[1] > 1 and self.table.stride(1) != 1:
            raise ValueError("page_table rows must be contiguous (stride 1 along a row)")
        if self.row_index is not None:
            check_tensor("req_pool_indices", self.row_index, dims=1,
                         dtypes=(torch.int32, torch.int64))
            if self.row_index.device != self.table.device:
                raise ValueError("req_pool_indices must be on the page table's device")
        if self.slot_map is not None:
            if not self.holds_token_slots:
                raise ValueError("slot_map applies to a table of token slots (from_req_to_token)")
            check_tensor("slot_map", self.slot_map, dims=1, dtypes=(torch.int64,))
            if self.slot_map.device != self.table.device or not self.slot_map.is_contiguous():
                raise ValueError("slot_map must be contiguous and on the page table's device")

    @classmethod
    def from_block_table(cls, block_table: torch.Tensor) -> "PageTable":
        """vLLM's block table: `block_table[r, p]` is the page of tokens [p * bs, (p + 1) * bs)."""
        return cls(block_table)

    @classmethod
    def from_req_to_token(cls, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                          slot_map: torch.Tensor | None = None) -> "PageTable":
        """SGLang's token-slot table, rows picked by `req_pool_indices`; `slot_map`: the
        full-to-window slot map of a hybrid sliding-window pool, for its window layers."""
        return cls(req_to_token, holds_token_slots=True, row_index=req_pool_indices,
                   slot_map=slot_map)

    @classmethod
    def over_rows(cls, lens, device) -> "PageTable":
        """A table of one-token pages over rows laid out request after request: request r's
        tokens are rows [sum(lens[:r]), sum(lens[:r + 1])) (see PagedKVCache.from_token_rows).
        Built on the host, one copy to `device`."""
        lens = np.asarray(lens, dtype=np.int64).reshape(-1)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        columns = np.arange(max(1, int(lens.max(initial=0))))
        table = np.where(columns < lens[:, None], starts[:, None] + columns, 0)
        return cls(torch.from_numpy(table.astype(np.int32)).to(device))

    def columns_needed(self, kv_len: int, page_size: int) -> int:
        """Columns of the table that a request of `kv_len` keys reads: one per token slot (SGLang)
        or one per page (vLLM)."""
        return kv_len if self.holds_token_slots else -(-kv_len // page_size)

    def _slots(self, row: int, length: int) -> torch.Tensor:
        slots = self.table[row, :length].long()
        if self.slot_map is None:
            return slots
        if length and not 0 <= int(slots.min()) <= int(slots.max()) < self.slot_map.numel():
            raise ValueError(f"page_table row {row} holds slots in [{int(slots.min())}, "
                             f"{int(slots.max())}]; slot_map has {self.slot_map.numel()} entries")
        return self.slot_map[slots]

    def _rows(self, batch_size: int) -> list[int] | range:
        """The table row of each request (synchronises with a row index), checked."""
        if self.row_index is None:
            return range(batch_size)
        rows = self.row_index[:batch_size].tolist()
        bad = [r for r in rows if not 0 <= r < self.table.shape[0]]
        if bad:
            raise ValueError(f"req_pool_indices (the page table's row_index) holds {bad[0]}; "
                             f"the table has rows 0..{self.table.shape[0] - 1}")
        return rows

    def page_ids(self, batch_size: int, kv_lens: list[int], page_size: int) -> list[torch.Tensor]:
        """Host-side page id of each page (vLLM) or token (SGLang) a request reads (synchronises;
        for debug checks)."""
        rows = self._rows(batch_size)
        ids = []
        for row, length in zip(rows, kv_lens):
            if self.holds_token_slots:
                ids.append(self._slots(row, length) // page_size)
            else:
                ids.append(self.table[row, : (length + page_size - 1) // page_size].long())
        return ids

    def token_slots(self, batch_size: int, kv_lens: list[int], page_size: int):
        """CSR (kv_indptr, kv_slots) of the tokens [0, kv_len) of each request."""
        rows = self._rows(batch_size)
        pieces = []
        for row, length in zip(rows, kv_lens):
            if self.holds_token_slots:
                pieces.append(self._slots(row, length))
            else:
                pages = self.table[row, : (length + page_size - 1) // page_size].long()
                t = torch.arange(length, device=pages.device)
                pieces.append(pages[t // page_size] * page_size + t % page_size)
        return _csr(list(kv_lens), pieces, self.table.device)
