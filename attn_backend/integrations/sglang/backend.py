"""attn_backend as an SGLang `AttentionBackend`: SGLang's batch metadata in, the shared core out.

Forward modes: EXTEND (with and without a cached prefix), MIXED, DECODE
(eager and CUDA graph), TARGET_VERIFY (speculative verification with SGLang's
chain or tree masks, eager and CUDA graph), DRAFT_EXTEND_V2 (the draft model's
extend over the accepted tokens, eager and CUDA graph) and IDLE. On CUDA, DECODE runs the
`PagedDecode` kernel and the others the `PagedPrefill` kernel; on CPU every
mode runs the float reference. K/V are written through the pool's own
`set_kv_buffer`, and skipped when the model passes `save_kv_cache=False`.

Plans are made once per forward: the backend collects its layers' shapes
(heads, head dims, window, causality) at construction, from the model's
`RadixAttention` modules (or the model config where it has none yet), and
`init_forward_metadata_out_graph` plans the wrapper of every shape for the
batch; a layer's forward only looks its wrapper up and launches. CUDA graphs:
that same call (outside the graph, before capture and before every replay)
re-plans the wrappers from the host `seq_lens_cpu` into their fixed buffers
(and packs a verify tree mask into a fixed bit buffer on the device); the
kernels read SGLang's `req_to_token` through the static `req_pool_indices`
buffer in place, so the graph itself needs no metadata ops. On CPU the same
wrappers run the float reference.

Hybrid sliding-window pools (SGLang's `SWAKVPool`, the default for models
with window layers): window layers read their K/V in the window pool through
the pool's full-to-window slot map (applied per token by the kernels, so the
graph reads the live map) and write through `KVWriteLoc.swa_loc`.

MLA models (DeepSeek-class, `MLATokenToKVPool`), on the kernels or (CPU) the float
reference: the absorbed layers (concatenated inputs, as SGLang hands them to a backend
outside its FORWARD_ABSORB_CORE list, or split `q_rope`/`k_rope`) read the pool's latent
rows (K = the 576-wide row, V = its first 512 columns), and the MHA layers of prefill
(`forward_normal`: K/V from `kv_b_proj` in the call, `save_kv_cache=False`) attend over the
K/V they are given: the new tokens, one-shot the whole sequences, or one chunk of the cached
prefixes (MHA_CHUNKED_KV, all keys visible, with LSE for SGLang's merge) (PagedPrefill at head
dims (192, 128) over the call's K/V as one-token pages, each kind planned once per forward).
Our forward-method handler makes SGLang's own MHA / one-shot / chunked / absorbed choice. On
CUDA the same wrappers run the MLA kernels (the latent kernel at (576, 512), the prefill
kernels at (192, 128)). FP8 MLA pools (`--kv-cache-dtype fp8_e4m3` / `fp8_e5m2`): the layer's
one scale (`k_scale_float` or `k_scale`; None is 1.0) applies to the whole latent row; our
write stores fp8(bf16(x / scale)), the bytes of SGLang's own path (its backends divide, the
pool casts), without touching the model's tensors, and the latent kernel reads the rows with
that scale.

Not yet (they raise with the reason, never a wrong result): other hybrid pool
kinds, cross-attention and SGLang's packed MLA pools (FP4, DSA's). SGLang picks draft-model backends
from its own list (--speculative-draft-attention-backend), so DRAFT_EXTEND_V2
reaches this backend where a harness builds it for the draft model (SGLang's
attention kit does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ... import fp8
from ..._validation import (KERNEL_DTYPES, KERNEL_FP8_DTYPES, MAX_GROUP_SIZE, MLA_HEAD_DIMS,
                             SUPPORTED_HEAD_DIMS)
from ...decode import PagedDecode
from ...kv_write import write_kv, write_latent_rows
from ...paged_kv import PagedKVCache, PageTable
from ...prefill import PagedPrefill
from . import BACKEND_NAME

_SUPPORTED_MODES = ("EXTEND", "MIXED", "DECODE", "IDLE", "TARGET_VERIFY", "DRAFT_EXTEND_V2")
_EAGER_MIN_TOKENS = 8192  # eager prefill wrappers start this large and grow by powers of two
_NON_CAUSAL = (AttentionType.ENCODER_ONLY, AttentionType.DECODER_BIDIRECTIONAL)


@dataclass(frozen=True)
class WrapperKey:
    """What a layer's kernel wrapper is built for: its heads, head dims, element types,
    window and causality. Layers of one key share one wrapper (and its plan)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_vo: int
    dtype: torch.dtype  # the queries' and outputs'
    kv_dtype: torch.dtype
    window_left: int  # -1: no window
    causal: bool

    @classmethod
    def for_layer(cls, layer, dtype: torch.dtype, kv_dtype: torch.dtype) -> "WrapperKey":
        causal = layer.attn_type not in _NON_CAUSAL
        window = getattr(layer, "sliding_window_size", -1)
        # Bidirectional (encoder-only) layers attend to the whole sequence, window or not.
        window_left = window if causal and window is not None and window >= 0 else -1
        return cls(layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim,
                   layer.v_head_dim, dtype, kv_dtype, window_left, causal)


def collect_layer_keys(model_runner, dtype: torch.dtype, kv_dtype: torch.dtype) -> frozenset:
    """The wrapper keys of the model's attention layers: from its `RadixAttention` modules
    (SGLang builds the attention backend after loading the model), or where the model has
    none yet (a harness that builds its layers later) from the model config: the config's
    heads over the tensor-parallel size, its head dims, with and without its window."""
    model = getattr(model_runner, "model", None)
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    keys = {WrapperKey.for_layer(m, dtype, kv_dtype) for m in modules
            if isinstance(m, RadixAttention)}
    if keys:
        return frozenset(keys)
    config = model_runner.model_config
    tp_size = getattr(model_runner, "tp_size", 1) or 1
    if hasattr(config, "get_num_attention_heads"):
        heads = config.get_num_attention_heads(tp_size)
        kv_heads = config.get_num_kv_heads(tp_size)
    else:
        heads = config.num_attention_heads // tp_size
        kv_heads = max(1, getattr(config, "num_key_value_heads", config.num_attention_heads)
                       // tp_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    head_dim_vo = getattr(config, "v_head_dim", None) or head_dim
    window = getattr(config, "sliding_window_size", None)
    windows = {-1} | ({window} if window is not None and window >= 0 else set())
    return frozenset(WrapperKey(heads, kv_heads, head_dim, head_dim_vo, dtype, kv_dtype, w, True)
                     for w in windows)


@dataclass
class ForwardMetadata:
    """What one forward's layers share: host lengths, the page tables, the planned wrappers."""

    kv_lens: np.ndarray  # int64 KV length of each request, its new (or draft) tokens included
    qo_indptr: np.ndarray  # int64 [batch + 1]: each request's query rows (1 for decode)
    page_table: PageTable
    custom_mask: torch.Tensor | None = None  # verify tree mask: flat [n, kv_len] blocks
    window_page_table: PageTable | None = None  # window layers of a hybrid pool: slots mapped
    wrappers: dict = field(default_factory=dict)  # WrapperKey -> wrapper planned for the batch
    # MLA models' MHA prefill: (key, one-shot) -> (wrapper planned, table over the call's K/V)
    mha_plans: dict = field(default_factory=dict)


class SGLangAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.device = torch.device(model_runner.device)
        self.page_size = model_runner.page_size
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.max_batch_size = self.req_to_token_pool.req_to_token.shape[0]
        self.forward_metadata: ForwardMetadata | None = None
        # The last page tables built and the tensors they view (see _page_tables).
        self._kept_page_tables: tuple | None = None
        self.dtype = model_runner.dtype
        self.kv_dtype = getattr(model_runner, "kv_cache_dtype", model_runner.dtype)
        self._fp8_pool = fp8.is_fp8(self.kv_dtype)  # the layers' scales apply
        self.mla = bool(getattr(model_runner, "use_mla_backend", False))
        self._check_supported(model_runner)
        if self.mla:
            config = model_runner.model_config
            self.kv_lora_rank = config.kv_lora_rank
            self.qk_rope_head_dim = config.qk_rope_head_dim
            # DeepSeek's chunked prefix cache builds each chunk's K/V indices through the
            # backend's translator (the runner's; None is SGLang's own default and breaks that
            # path). Our kernels read req_to_token in place, which a plain pool's ids name.
            self.kv_index_translator = getattr(model_runner, "kv_index_translator", None)
        self.layer_keys = self._mla_layer_keys(model_runner) if self.mla else \
            collect_layer_keys(model_runner, self.dtype, self.kv_dtype)
        self._check_layer_shapes()
        self._decoders: dict[WrapperKey, PagedDecode] = {}
        self._prefills: dict[tuple, PagedPrefill] = {}  # eager: grow with the batch
        self._graph_prefills: dict[tuple, PagedPrefill] = {}  # verify / draft-extend graphs
        self._layer_key_cache: dict[tuple, WrapperKey] = {}
        self._cuda_graphs = False  # set by init_cuda_graph_state: wrappers use fixed grids
        self._graph_max_tokens = 0
        # A hybrid pool keeps window layers in a second pool (SWAKVPool, checked above).
        self._hybrid_pool = self.token_to_kv_pool \
            if isinstance(self.token_to_kv_pool, BaseSWAKVPool) else None

    def _check_supported(self, model_runner) -> None:
        """Reject at construction what this version cannot serve, naming the setting."""
        pool = model_runner.token_to_kv_pool
        packed_pools = {"MLATokenToKVPoolFP4", "DSATokenToKVPool"}  # scales beside the values
        if self.mla and any(c.__name__ in packed_pools for c in type(pool).__mro__):
            raise ValueError(f"{BACKEND_NAME}: MLA pool {type(pool).__name__} is not "
                             "supported; supported: MLATokenToKVPool (--kv-cache-dtype auto, "
                             "fp8_e4m3 or fp8_e5m2)")
        if isinstance(pool, BaseSWAKVPool) and not _is_plain_swa_pool(pool):
            # Other hybrid kinds (request windows, unified or draft pools) address their
            # window layers differently; reading them through the slot map would be wrong.
            raise ValueError(f"{BACKEND_NAME}: hybrid KV pool {type(pool).__name__} is not "
                             "supported; supported: SWAKVPool with a full-to-SWA slot map over "
                             "MHA sub-pools (or --disable-hybrid-swa-memory)")
        if self.device.type == "cuda" and self.kv_dtype not in KERNEL_DTYPES + KERNEL_FP8_DTYPES:
            raise ValueError(f"{BACKEND_NAME}: kv cache dtype {self.kv_dtype} is not supported; "
                             "accepted: float16, bfloat16 (--kv-cache-dtype auto), "
                             "float8_e4m3fn (fp8_e4m3), float8_e5m2 (fp8_e5m2)")

    def _check_layer_shapes(self) -> None:
        if self.device.type != "cuda":
            return  # the float reference serves any head size and group
        if self.mla:
            if (self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank) != MLA_HEAD_DIMS:
                raise ValueError(f"{BACKEND_NAME}: MLA with kv_lora_rank {self.kv_lora_rank} and "
                                 f"rope {self.qk_rope_head_dim} is not compiled; supported: "
                                 f"{MLA_HEAD_DIMS[1]} + {MLA_HEAD_DIMS[0] - MLA_HEAD_DIMS[1]}")
            return
        for key in self.layer_keys:
            if (key.head_dim, key.head_dim_vo) not in SUPPORTED_HEAD_DIMS:
                raise ValueError(f"{BACKEND_NAME}: head dims (qk={key.head_dim}, "
                                 f"v={key.head_dim_vo}) are not compiled; supported: "
                                 f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
            group = key.num_qo_heads // key.num_kv_heads
            if not 1 <= group <= MAX_GROUP_SIZE:
                raise ValueError(f"{BACKEND_NAME}: {key.num_qo_heads} query heads over "
                                 f"{key.num_kv_heads} kv heads is a group of {group}; "
                                 f"supported: 1..{MAX_GROUP_SIZE}")

    # ---- per-forward metadata -------------------------------------------------------------

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Host-side metadata of one forward (eager, graph capture and replay alike), and the
        plans of every layer shape for it.

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
        # (Tensor.numpy(): a view, as np.asarray gives, without its conversion protocol's cost.)
        kv_lens = seq_lens.numpy().astype(np.int64, copy=False) \
            if isinstance(seq_lens, torch.Tensor) else np.asarray(seq_lens, dtype=np.int64)
        custom_mask = None
        # Decode and verify (every replayed step) give each request the same number of query
        # rows: their offsets are a range, not a prefix sum.
        if mode.is_decode():
            qo_indptr = np.arange(len(kv_lens) + 1, dtype=np.int64)
        elif mode.is_target_verify():
            # seq_lens is the committed prefix; the n drafts' K/V were just written after it.
            spec_info = forward_batch.spec_info
            drafts = getattr(spec_info, "num_tokens_per_req", None) or spec_info.draft_token_num
            qo_indptr = np.arange(0, (len(kv_lens) + 1) * drafts, drafts, dtype=np.int64)
            kv_lens = kv_lens + drafts
            # A chain (topk 1) is causal over the drafts; a tree needs its mask.
            if getattr(spec_info, "topk", None) != 1:
                custom_mask = spec_info.custom_mask
        else:
            if mode.is_draft_extend_v2():
                extend_lens, kv_lens = self._draft_extend_lengths(forward_batch, kv_lens)
            else:
                extend_lens = self._extend_lens(forward_batch)
            qo_indptr = np.concatenate([[0], np.cumsum(extend_lens)])
        page_table, window_page_table = self._page_tables(forward_batch.req_pool_indices)
        meta = ForwardMetadata(kv_lens=kv_lens, qo_indptr=qo_indptr, page_table=page_table,
                               custom_mask=custom_mask, window_page_table=window_page_table)
        self.forward_metadata = meta
        if mode.is_decode() and not self.mla:  # MLA decodes on the prefill-family kernel
            for key in self.layer_keys:
                if key.causal:
                    decoder = self._decoder(key)
                    decoder.plan(kv_lens, window_left=key.window_left)
                    meta.wrappers[key] = decoder
        else:
            # Only verify, draft-extend and (MLA's) decode batches replay in captured graphs;
            # extends run eagerly (also between the pieces of SGLang's piecewise and breakable
            # graphs), so their wrappers grow.
            graph_sized = self._cuda_graphs and (mode.is_target_verify() or
                                                 mode.is_draft_extend_v2() or mode.is_decode())
            for key in self.layer_keys:
                prefill = self._prefill(key, graph_sized, int(meta.qo_indptr[-1]))
                prefill.plan(meta.qo_indptr, kv_lens, causal=key.causal,
                             window_left=key.window_left, custom_mask=custom_mask)
                meta.wrappers[key] = prefill

    @staticmethod
    def _extend_lens(forward_batch) -> np.ndarray:
        extend_cpu = getattr(forward_batch, "extend_seq_lens_cpu", None)
        return np.asarray(extend_cpu if extend_cpu is not None else
                          forward_batch.extend_seq_lens.cpu(), dtype=np.int64)

    def _draft_extend_lengths(self, forward_batch, seq_lens: np.ndarray):
        """(query rows, kv lengths) of a draft extend. seq_lens already counts the extend's
        tokens. Eagerly each request has its extend's rows; in SGLang's draft-extend graphs
        every request has the captured width (spec_info.num_tokens_per_req) while
        spec_info.extend_seq_lens_cpu keeps the real extends: as in SGLang's triton backend,
        query i then sits at (seq_len - extend) + i. Padded graph rows (seq_len = the fill
        value) get kv_len = their width, so they never read outside their pool row (the graph's
        req_to_token rows are as long as any context)."""
        if getattr(forward_batch, "extend_seq_lens_cpu", None) is not None or \
                getattr(forward_batch, "extend_seq_lens", None) is not None:
            rows = self._extend_lens(forward_batch)
            return rows, np.maximum(seq_lens, rows)  # a graph capture's rows hold fill values
        spec_info = forward_batch.spec_info
        rows = np.full_like(seq_lens, spec_info.num_tokens_per_req)
        extend_cpu = getattr(spec_info, "extend_seq_lens_cpu", None)
        extend = np.asarray(extend_cpu, dtype=np.int64)[: len(seq_lens)] \
            if extend_cpu is not None else rows
        return rows, np.maximum(seq_lens - extend + rows, rows)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Decoders made from now on use grids fixed per batch size, as captured graphs need."""
        self._cuda_graphs = True
        self.max_batch_size = max(self.max_batch_size, max_bs)
        self._graph_max_tokens = max(self._graph_max_tokens, max_num_tokens)
        # Eager-mode wrappers size their grid from the lengths; graph ones from the batch.
        self._decoders.clear()
        self._graph_prefills.clear()

    def get_verify_buffers_to_fill_after_draft(self):
        return [None, None]  # the tree mask is read from spec_info at each plan

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        pass  # nothing is derived from the mask or positions before the next plan

    def get_cuda_graph_seq_len_fill_value(self):
        return 1  # a padded row reads one token (slot 0 of pool row 0), never an empty range

    # ---- forward --------------------------------------------------------------------------

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, kwargs)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache, kwargs):
        """Every mode alike: the layer's wrapper (decode or prefill, as this forward's metadata
        planned it) over the pool's buffers, after the K/V write."""
        if self.mla:
            return self._forward_mla(q, k, v, layer, forward_batch, save_kv_cache, kwargs)
        self._check_layer(layer, kwargs)
        cache = self._cache(layer)  # the write (FP8) and the read see one cache object
        self._save_kv(layer, forward_batch, k, v, save_kv_cache, cache)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self._wrapper(layer, q3.dtype).run(
            q3, cache, self._page_table(layer), sm_scale=layer.scaling,
            logits_soft_cap=max(layer.logit_cap, 0.0))
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _forward_mla(self, q, k, v, layer, forward_batch, save_kv_cache, kwargs):
        """An MLA model's layer: absorbed (latent rows of the pool) or MHA (prefill's
        decompressed K/V, given in the call)."""
        if layer.is_cross_attention:
            raise NotImplementedError(f"{BACKEND_NAME}: cross-attention layers are not supported")
        if not self._is_absorbed(layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim):
            return self._forward_mla_mha(q, k, v, layer, forward_batch)
        q_rope, k_rope = kwargs.get("q_rope"), kwargs.get("k_rope")
        pool = self.token_to_kv_pool
        scale = _layer_scales(layer)[0] if self._fp8_pool else None
        rows = pool.get_key_buffer(layer.layer_id)
        if save_kv_cache and k is not None:
            self._save_latent(layer, forward_batch.out_cache_loc, k, k_rope, rows, scale)
        heads = layer.tp_q_head_num
        if q_rope is not None:
            q3 = torch.cat([q.reshape(-1, heads, self.kv_lora_rank),
                            q_rope.reshape(-1, heads, self.qk_rope_head_dim)], dim=-1)
        else:
            q3 = q.reshape(-1, heads, layer.qk_head_dim)
        cache = PagedKVCache.from_mla(rows, self.kv_lora_rank, self.page_size, scale=scale)
        out = self._wrapper(layer, q3.dtype).run(q3, cache, self._page_table(layer),
                                                 sm_scale=layer.scaling)
        return out.reshape(-1, heads * layer.v_head_dim)

    def _save_latent(self, layer, loc, k, k_rope, rows, scale) -> None:
        """Stores the new tokens' latent rows: split (k the latent part, k_rope its rope part)
        or concatenated (k the whole row)."""
        pool = self.token_to_kv_pool
        if not self._fp8_pool:
            if k_rope is not None:
                pool.set_mla_kv_buffer(layer, KVWriteLoc(loc), k.reshape(-1, 1, self.kv_lora_rank),
                                       k_rope.reshape(-1, 1, self.qk_rope_head_dim))
            else:  # the pool stores k only
                pool.set_kv_buffer(layer, KVWriteLoc(loc), k, k)
            return
        if k_rope is None:
            k = k.reshape(-1, 1, self.kv_lora_rank + self.qk_rope_head_dim)
            k, k_rope = k[..., :self.kv_lora_rank], k[..., self.kv_lora_rank:]
        # The pool's rows as pages of one slot (slot = buffer row).
        write_latent_rows(rows.unsqueeze(1), loc, k.reshape(-1, 1, self.kv_lora_rank),
                          k_rope.reshape(-1, 1, self.qk_rope_head_dim), scale=scale,
                          via_input_dtype=True)

    def _forward_mla_mha(self, q, k, v, layer, forward_batch):
        """SGLang's MHA prefill of an MLA model (forward_normal): attention of the new tokens
        over the K/V the model decompressed for this call. Those cover the new tokens (MHA:
        causal), each request's whole sequence (`mha_one_shot`: causal), or one chunk of the
        cached prefixes (`attn_attend_prefix_cache`, MHA_CHUNKED_KV: all keys of the chunk,
        `prefix_chunk_idx`; SGLang merges the chunks' and the new tokens' results by LSE).
        Returns (out, lse) where the model asks (`mha_return_lse`)."""
        heads, kv_heads = layer.tp_q_head_num, layer.tp_k_head_num
        q3 = q.reshape(-1, heads, layer.qk_head_dim)
        k3 = k.reshape(-1, kv_heads, layer.qk_head_dim)
        v3 = v.reshape(-1, kv_heads, layer.v_head_dim)
        q_lens = self._extend_lens(forward_batch)
        if getattr(forward_batch, "attn_attend_prefix_cache", None):
            chunk = int(forward_batch.prefix_chunk_idx)
            kind, causal = ("prefix_chunk", chunk), False
            kv_lens = np.asarray(forward_batch.prefix_chunk_seq_lens_cpu[chunk], dtype=np.int64)
        elif getattr(forward_batch, "mha_one_shot", False):
            kind, causal = "one_shot", True
            kv_lens = np.asarray(forward_batch.seq_lens_cpu, dtype=np.int64)
        else:
            kind, causal, kv_lens = "new_tokens", True, q_lens
        if int(kv_lens.sum()) != k3.shape[0]:
            raise ValueError(f"{BACKEND_NAME}: the MHA call has {k3.shape[0]} K/V rows, the "
                             f"batch's lengths need {int(kv_lens.sum())}")
        key = WrapperKey(heads, kv_heads, layer.qk_head_dim, layer.v_head_dim, q3.dtype,
                         k3.dtype, -1, causal)
        # Planned once per forward: every MHA layer of the model has this shape and lengths.
        plans = self.forward_metadata.mha_plans
        if (key, kind) not in plans:
            prefill = self._prefill(key, False, int(q_lens.sum()), slot=kind)
            prefill.plan(np.concatenate([[0], np.cumsum(q_lens)]), kv_lens, causal=causal)
            plans[(key, kind)] = (prefill, PageTable.over_rows(kv_lens, self.device))
        prefill, table = plans[(key, kind)]
        # The call's K/V as a cache of one-token pages: request r's keys are its rows in order.
        out, lse = prefill.run(q3, PagedKVCache.from_token_rows(k3, v3), table,
                               sm_scale=layer.scaling, return_lse=True)
        out = out.reshape(-1, heads * layer.v_head_dim)
        return (out, lse) if getattr(forward_batch, "mha_return_lse", False) else out

    def _mla_layer_keys(self, model_runner) -> frozenset:
        """An MLA model's planned shapes: its absorbed layers' (the MHA layers attend over the
        K/V of their call, planned when they first run in a forward). From the model's modules,
        or where it has none yet from the config: SGLang's model config gives MLA models other
        head dims (256 / 128) than the absorbed layers' (rank + rope / rank)."""
        keys = frozenset(k for k in collect_layer_keys(model_runner, self.dtype, self.kv_dtype)
                         if self._is_absorbed(k.num_kv_heads, k.head_dim, k.head_dim_vo))
        if keys:
            return keys
        heads = model_runner.model_config.get_num_attention_heads(
            getattr(model_runner, "tp_size", 1) or 1)
        return frozenset({WrapperKey(heads, 1, self.kv_lora_rank + self.qk_rope_head_dim,
                                     self.kv_lora_rank, self.dtype, self.kv_dtype, -1, True)})

    def _is_absorbed(self, num_kv_heads: int, head_dim: int, head_dim_vo: int) -> bool:
        """An MLA model's attention over the latent cache (attn_mqa), not its MHA prefill."""
        return num_kv_heads == 1 and head_dim_vo == self.kv_lora_rank and \
            head_dim == self.kv_lora_rank + self.qk_rope_head_dim

    # ---- helpers --------------------------------------------------------------------------

    def _wrapper(self, layer, dtype):
        """The wrapper planned for this forward for `layer`'s shape."""
        cache_key = (layer.layer_id, dtype)
        key = self._layer_key_cache.get(cache_key)
        if key is None:
            key = self._layer_key_cache[cache_key] = WrapperKey.for_layer(layer, dtype,
                                                                          self.kv_dtype)
        wrapper = self.forward_metadata.wrappers.get(key)
        if wrapper is None:
            raise RuntimeError(f"{BACKEND_NAME}: layer {layer.layer_id} has shape {key}, which "
                               "is not among the layer shapes collected when the backend was "
                               f"built ({sorted(map(str, self.layer_keys))}); plans are made "
                               "per forward for those")
        return wrapper

    def _check_layer(self, layer, kwargs) -> None:
        if layer.is_cross_attention:
            raise NotImplementedError(f"{BACKEND_NAME}: cross-attention layers are not supported")
        if kwargs.get("q_rope") is not None or kwargs.get("k_rope") is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: MLA (q_rope/k_rope) is not supported")
        if layer.logit_cap > 0 and getattr(layer, "logit_capping_method", "tanh") != "tanh":
            raise NotImplementedError(f"{BACKEND_NAME}: logit capping method "
                                      f"{layer.logit_capping_method!r}; supported: 'tanh'")

    def _save_kv(self, layer, forward_batch, k, v, save_kv_cache, cache: PagedKVCache) -> None:
        if save_kv_cache and k is not None and v is not None:
            loc = forward_batch.out_cache_loc
            # Translated at every call, never cached: inside a CUDA graph the gather must be
            # one of the graph's own ops so that each replay translates its new locations.
            swa_loc = self._hybrid_pool.translate_loc_from_full_to_swa(loc) \
                if self._is_window_layer(layer) else None
            if not self._fp8_pool:
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(loc, swa_loc=swa_loc), k, v)
                return
            # FP8: our quantising write, one launch, with the rounding of SGLang's store (its
            # bf16/fp16 quotient, then the cast: the same bytes) but without its in-place
            # division of the model's K/V and its copies.
            slots = swa_loc if swa_loc is not None else loc
            write_kv(cache, slots,
                     k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
                     v.view(-1, layer.tp_k_head_num, layer.v_head_dim), via_input_dtype=True)

    def _page_tables(self, req_pool_indices: torch.Tensor):
        """(page table, window page table or None) over the pool's req_to_token, rows picked
        by `req_pool_indices`. A graph replay hands over the same static index buffer every
        step (new values, same tensor): its tables are kept, not rebuilt and checked again."""
        req_to_token = self.req_to_token_pool.req_to_token
        slot_map = self._slot_map() if self._hybrid_pool is not None else None
        kept = self._kept_page_tables
        if kept is not None and kept[0] is req_pool_indices and kept[1] is req_to_token and \
                kept[2] is slot_map:
            return kept[3]
        tables = (PageTable.from_req_to_token(req_to_token, req_pool_indices),
                  PageTable.from_req_to_token(req_to_token, req_pool_indices, slot_map=slot_map)
                  if slot_map is not None else None)
        self._kept_page_tables = (req_pool_indices, req_to_token, slot_map, tables)
        return tables

    def _is_window_layer(self, layer) -> bool:
        """Whether `layer` lives in the window pool of a hybrid pool."""
        return self._hybrid_pool is not None and \
            self._hybrid_pool.layers_mapping[layer.layer_id][1]

    def _slot_map(self) -> torch.Tensor:
        mapping = self._hybrid_pool.full_to_swa_index_mapping
        if mapping is None:
            raise RuntimeError(f"{BACKEND_NAME}: the hybrid pool has no full-to-SWA slot map "
                               "registered (its allocator registers it at startup)")
        return mapping

    def _page_table(self, layer) -> PageTable:
        """This forward's page table for `layer`: window layers of a hybrid pool read their
        slots through the pool's full-to-window map."""
        meta = self.forward_metadata
        return meta.window_page_table if self._is_window_layer(layer) else meta.page_table

    def _cache(self, layer) -> PagedKVCache:
        pool = self.token_to_kv_pool
        k_scale, v_scale = _layer_scales(layer) if self._fp8_pool else (None, None)
        return PagedKVCache.from_sglang(pool.get_key_buffer(layer.layer_id),
                                        pool.get_value_buffer(layer.layer_id), self.page_size,
                                        k_scale=k_scale, v_scale=v_scale)

    def _check_not_capturing(self, what: str) -> None:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{BACKEND_NAME}: a {what} wrapper would be built inside CUDA "
                               "graph capture; the metadata of a captured mode must be "
                               "initialised before capture")

    def _decoder(self, key: WrapperKey) -> PagedDecode:
        decoder = self._decoders.get(key)
        if decoder is None:
            self._check_not_capturing("decode")
            decoder = self._decoders[key] = PagedDecode(
                num_qo_heads=key.num_qo_heads, num_kv_heads=key.num_kv_heads,
                head_dim=key.head_dim, head_dim_vo=key.head_dim_vo, dtype=key.dtype,
                kv_dtype=key.kv_dtype, device=self.device, max_batch_size=self.max_batch_size,
                use_cuda_graph=self._cuda_graphs)
        return decoder

    def _prefill(self, key: WrapperKey, graph_sized: bool, num_tokens: int,
                 slot=None) -> PagedPrefill:
        """The prefill wrapper of `key`: graph-sized ones (verify and draft-extend graphs) are
        sized for the captured batches; eager ones grow by powers of two when a batch brings
        more tokens. `slot`: a wrapper of its own for each plan that must live beside the
        others of its shape in one forward (an MLA model's new-token and prefix-chunk plans)."""
        wrappers = self._graph_prefills if graph_sized else self._prefills
        prefill = wrappers.get((key, slot))
        if prefill is None or (not graph_sized and num_tokens > prefill.max_num_tokens):
            self._check_not_capturing("prefill")
            if graph_sized:
                max_tokens = max(self._graph_max_tokens, num_tokens)
                mask_elements = max_tokens * self.req_to_token_pool.req_to_token.shape[1]
            else:
                max_tokens = max(_EAGER_MIN_TOKENS, 1 << (num_tokens - 1).bit_length())
                mask_elements = 0  # grows on demand
            prefill = wrappers[(key, slot)] = PagedPrefill(
                num_qo_heads=key.num_qo_heads, num_kv_heads=key.num_kv_heads,
                head_dim=key.head_dim, head_dim_vo=key.head_dim_vo, dtype=key.dtype,
                kv_dtype=key.kv_dtype, device=self.device, max_batch_size=self.max_batch_size,
                max_num_tokens=max_tokens, max_mask_elements=mask_elements,
                use_cuda_graph=graph_sized)
        return prefill


def _layer_scales(layer):
    """An FP8 layer's K and V scales as SGLang keeps them: the host floats `k_scale_float` /
    `v_scale_float` when the quantisation method set them, else `k_scale` / `v_scale` (a 0-d
    Parameter, or the bare float `--quantization-param-path` sets); None means 1.0."""
    def scale(name):
        value = getattr(layer, f"{name}_float", None)
        return getattr(layer, name, None) if value is None else value

    return scale("k_scale"), scale("v_scale")


def _is_plain_swa_pool(pool) -> bool:
    """SGLang's SWAKVPool over MHA sub-pools, addressed through a full-to-SWA slot map."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return (type(pool).__name__ == "SWAKVPool" and hasattr(pool, "layers_mapping")
            and hasattr(pool, "full_to_swa_index_mapping")
            and isinstance(getattr(pool, "full_kv_pool", None), MHATokenToKVPool)
            and isinstance(getattr(pool, "swa_kv_pool", None), MHATokenToKVPool)
            and getattr(pool, "request_window", None) is None
            and not getattr(pool, "swa_uses_full_indices", False))
