"""attn_backend as an SGLang `AttentionBackend`: SGLang's batch metadata in, the shared core out.

Forward modes in this version: EXTEND (with and without a cached prefix),
MIXED, DECODE (eager and CUDA graph) and IDLE. DECODE runs the `PagedDecode`
kernel on CUDA; EXTEND and MIXED run the float reference until the prefill
kernel lands (issue 4); on CPU every mode runs the reference. K/V are written
through the pool's own `set_kv_buffer`, and skipped when the model passes
`save_kv_cache=False`.

CUDA graphs: `init_forward_metadata_out_graph` (outside the graph, before
capture and before every replay) re-plans every decoder from the host
`seq_lens_cpu` into its fixed buffers; the kernels read SGLang's
`req_to_token` through the static `req_pool_indices` buffer in place, so the
graph itself needs no metadata ops.

Not yet (they raise with the reason, never a wrong result): TARGET_VERIFY /
DRAFT_EXTEND_V2 (speculative decoding), MLA, cross-attention and quantised KV
caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ... import reference
from ..._validation import KERNEL_DTYPES
from ...decode import MAX_GROUP_SIZE, SUPPORTED_HEAD_DIMS, PagedDecode
from ...paged_kv import PagedKVCache, PageTable, slots_from_req_to_token
from . import BACKEND_NAME

_SUPPORTED_MODES = ("EXTEND", "MIXED", "DECODE", "IDLE")


@dataclass
class ForwardMetadata:
    """What one forward's layers share: host lengths, the page table, plans made so far."""

    seq_lens: np.ndarray  # int64 KV length of each request, new tokens included
    qo_indptr: np.ndarray  # int64 [batch + 1]: each request's query rows (1 for decode)
    req_pool_indices: torch.Tensor
    page_table: PageTable
    token_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # CSR, for the reference
    planned_decoders: set = field(default_factory=set)


class SGLangAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.device = torch.device(model_runner.device)
        self.page_size = model_runner.page_size
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.max_batch_size = self.req_to_token_pool.req_to_token.shape[0]
        self.forward_metadata: ForwardMetadata | None = None
        self._decoders: dict[tuple, PagedDecode] = {}
        self._cuda_graphs = False  # set by init_cuda_graph_state: decoders use fixed grids
        self._check_supported(model_runner)

    def _check_supported(self, model_runner) -> None:
        """Reject at construction what this version cannot serve, naming the setting."""
        if getattr(model_runner, "use_mla_backend", False):
            raise ValueError(f"{BACKEND_NAME}: MLA models are not supported yet; use "
                             "--attention-backend flashinfer or triton for this model")
        kv_dtype = getattr(model_runner, "kv_cache_dtype", model_runner.dtype)
        if self.device.type != "cuda":
            return  # the float reference serves any head size and dtype
        if kv_dtype not in KERNEL_DTYPES:
            raise ValueError(f"{BACKEND_NAME}: kv cache dtype {kv_dtype} is not supported; "
                             "accepted: float16, bfloat16 (--kv-cache-dtype auto)")
        config = model_runner.model_config
        head_dim = getattr(config, "head_dim", None)
        v_head_dim = getattr(config, "v_head_dim", head_dim)
        if head_dim is not None and (head_dim, v_head_dim) not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{BACKEND_NAME}: head dims (qk={head_dim}, v={v_head_dim}) are not "
                             f"compiled; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None)
        if heads and kv_heads and not 1 <= heads // kv_heads <= MAX_GROUP_SIZE:
            raise ValueError(f"{BACKEND_NAME}: {heads} query heads over {kv_heads} kv heads is a "
                             f"group of {heads // kv_heads}; supported: 1..{MAX_GROUP_SIZE}")

    # ---- per-forward metadata -------------------------------------------------------------

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Host-side metadata of one forward (eager, graph capture and replay alike).

        `forward_batch` is a ForwardBatch, or at replay SGLang's view of the
        padded static buffers (decode fields only).
        """
        mode = forward_batch.forward_mode
        if mode.name not in _SUPPORTED_MODES:
            raise NotImplementedError(f"{BACKEND_NAME}: forward mode {mode.name} is not supported "
                                      f"yet (supported: {', '.join(_SUPPORTED_MODES)})")
        if mode.is_idle():
            self.forward_metadata = None
            return
        seq_lens_cpu = forward_batch.seq_lens_cpu
        seq_lens = (seq_lens_cpu if seq_lens_cpu is not None else forward_batch.seq_lens.cpu())
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        if mode.is_decode():
            extend_lens = np.ones_like(seq_lens)
        else:
            extend_cpu = getattr(forward_batch, "extend_seq_lens_cpu", None)
            extend_lens = np.asarray(extend_cpu if extend_cpu is not None else
                                     forward_batch.extend_seq_lens.cpu(), dtype=np.int64)
        req_pool_indices = forward_batch.req_pool_indices
        self.forward_metadata = ForwardMetadata(
            seq_lens=seq_lens,
            qo_indptr=np.concatenate([[0], np.cumsum(extend_lens)]),
            req_pool_indices=req_pool_indices,
            page_table=PageTable.from_req_to_token(self.req_to_token_pool.req_to_token,
                                                   req_pool_indices, self.page_size),
        )
        if mode.is_decode():
            # Before a capture or replay: the graph replays these buffers. (Decoders
            # exist only where the decode kernel runs.)
            for key, decoder in self._decoders.items():
                decoder.plan(self.forward_metadata.seq_lens, window_left=key[-1])
                self.forward_metadata.planned_decoders.add(key)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Decoders made from now on use grids fixed per batch size, as captured graphs need."""
        self._cuda_graphs = True
        self.max_batch_size = max(self.max_batch_size, max_bs)
        self._decoders.clear()  # eager-mode decoders size their grid from the lengths

    def get_cuda_graph_seq_len_fill_value(self):
        return 1  # a padded row reads one token (slot 0 of pool row 0), never an empty range

    # ---- forward --------------------------------------------------------------------------

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer, kwargs)
        self._save_kv(layer, forward_batch, k, v, save_kv_cache)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if self.device.type != "cuda":
            out = self._attend_reference(q3, layer, causal=True)
        else:
            decoder = self._planned_decoder(layer, q3.dtype)
            out = decoder.run(q3, self._cache(layer), self.forward_metadata.page_table,
                              sm_scale=layer.scaling, logits_soft_cap=max(layer.logit_cap, 0.0))
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer, kwargs)
        self._save_kv(layer, forward_batch, k, v, save_kv_cache)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        causal = layer.attn_type not in (AttentionType.ENCODER_ONLY,
                                         AttentionType.DECODER_BIDIRECTIONAL)
        out = self._attend_reference(q3, layer, causal=causal)
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    # ---- helpers --------------------------------------------------------------------------

    def _check_layer(self, layer, kwargs) -> None:
        if layer.is_cross_attention:
            raise NotImplementedError(f"{BACKEND_NAME}: cross-attention layers are not supported")
        if kwargs.get("q_rope") is not None or kwargs.get("k_rope") is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: MLA (q_rope/k_rope) is not supported")
        if layer.logit_cap > 0 and getattr(layer, "logit_capping_method", "tanh") != "tanh":
            raise NotImplementedError(f"{BACKEND_NAME}: logit capping method "
                                      f"{layer.logit_capping_method!r}; supported: 'tanh'")

    def _save_kv(self, layer, forward_batch, k, v, save_kv_cache) -> None:
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc),
                                                k, v)

    def _cache(self, layer) -> PagedKVCache:
        pool = self.token_to_kv_pool
        return PagedKVCache.from_sglang(pool.get_key_buffer(layer.layer_id),
                                        pool.get_value_buffer(layer.layer_id), self.page_size)

    def _window_left(self, layer) -> int:
        window = getattr(layer, "sliding_window_size", -1)
        return window if window is not None and window >= 0 else -1

    def _planned_decoder(self, layer, dtype) -> PagedDecode:
        """The decoder for this layer's shape and window, planned once per forward."""
        window_left = self._window_left(layer)
        key = (layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim,
               dtype, window_left)
        decoder = self._decoders.get(key)
        if decoder is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{BACKEND_NAME}: a decode layer shape first seen inside CUDA "
                                   "graph capture; its plan must be made before (warm up eagerly)")
            decoder = PagedDecode(num_qo_heads=key[0], num_kv_heads=key[1], head_dim=key[2],
                                  head_dim_vo=key[3], dtype=dtype, device=self.device,
                                  max_batch_size=self.max_batch_size,
                                  use_cuda_graph=self._cuda_graphs)
            self._decoders[key] = decoder
        meta = self.forward_metadata
        if key not in meta.planned_decoders:
            decoder.plan(meta.seq_lens, window_left=window_left)
            meta.planned_decoders.add(key)
        return decoder

    def _attend_reference(self, q3, layer, *, causal: bool) -> torch.Tensor:
        """The float reference over SGLang's token slots (exact for any slot layout)."""
        meta = self.forward_metadata
        if meta.token_slots is None:
            meta.token_slots = slots_from_req_to_token(
                self.req_to_token_pool.req_to_token, meta.req_pool_indices,
                torch.from_numpy(meta.seq_lens))
        kv_indptr, kv_slots = meta.token_slots
        result = reference.attention(
            q3, meta.qo_indptr.tolist(), self._cache(layer), kv_indptr, kv_slots,
            sm_scale=layer.scaling,
            causal=causal, window_left=self._window_left(layer) if causal else -1,
            logits_soft_cap=max(layer.logit_cap, 0.0))
        return result.out.to(q3.dtype)
