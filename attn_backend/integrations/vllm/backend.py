"""attn_backend as a vLLM V1 attention backend: vLLM's batch metadata in, the shared core out.

- `AttnBackend` (`get_name()` = "ATTN_BACKEND") and `AttnBackendAsCustom` ("CUSTOM"):
  capability hooks that say what the kernels serve, so vLLM's
  `validate_configuration` accepts exactly that and names the reason otherwise.
- `AttnBackendMetadataBuilder.build()` runs on the host before every forward
  (eager, CUDA-graph capture and replay alike). It splits the batch into the
  leading one-token decodes (the `PagedDecode` kernel) and the rest (the
  `PagedPrefill` kernel: prefills, chunked extends, speculative verification),
  and plans both, for every window of its layers, from host lengths into fixed
  buffers. `forward` then only launches kernels (the impl never calls back into
  the builder), which read vLLM's block table and the K||V-packed cache in
  place; on CPU the same wrappers run the float reference.
- CUDA graphs: UNIFORM_BATCH. A captured graph serves batches of one query
  length (decode, or 1 + k speculative tokens), with vLLM's padding requests
  (no queries, no keys); the grids depend only on the padded batch. Mixed
  batches run eagerly or piecewise: which kernel serves a request depends on
  the batch's mix, so one graph cannot serve all mixes.
- K/V are written by our `paged_kv_write` kernel in `do_kv_cache_update`
  (slot -1 skipped), not by layers that share another layer's cache.
- FP8 caches (`fp8`, `fp8_e4m3`, `fp8_e5m2`): vLLM's uint8 cache is re-viewed by the
  string; the layer's `_k_scale` / `_v_scale` (per tensor, or per kv head for
  compressed-tensors `attn_head` checkpoints) are read at every call, since vLLM may
  replace those buffers after loading, and handed to the kernels as device tensors, which
  each launch (and each graph replay) reads. Writes quantise with vLLM's convention (x / scale
  in float32, nearest even, saturated). Queries stay in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)

from ... import fp8
from ..._validation import KERNEL_DTYPES, SUPPORTED_HEAD_DIMS
from ...decode import PagedDecode
from ...kv_write import write_kv
from ...paged_kv import PagedKVCache, PageTable
from ...prefill import PagedPrefill
from . import BACKEND_NAME


class KernelCapabilities:
    """What the kernels need of vLLM's configuration, for both backend classes (MHA and MLA):
    listed first among their bases, so these answer vLLM's validate_configuration."""

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        # mma.sync and cp.async: Ampere and newer (sm_90 adds the wgmma prefill).
        return capability is None or (capability.major, capability.minor) >= (8, 0)

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False  # build() plans from the host query lengths

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # Encoder-only and cross attention have no paged self-KV to read.
        return attn_type == AttentionType.DECODER


class AttnBackend(KernelCapabilities, AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(KERNEL_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16",
                                                       *fp8.ENGINE_FP8_STRINGS]
    forward_includes_kv_cache_update: bool = False  # vLLM calls impl.do_kv_cache_update

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["AttnBackendImpl"]:
        return AttnBackendImpl

    @staticmethod
    def get_builder_cls() -> type["AttnBackendMetadataBuilder"]:
        return AttnBackendMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]  # the kernels address any page size

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return sorted({qk for qk, vo in SUPPORTED_HEAD_DIMS if qk == vo})

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True  # bidirectional decoder blocks: the prefill kernel's non-causal plan

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return True  # the kernels read one K and one V scale per kv head


class AttnBackendAsCustom(AttnBackend):
    """The same backend under vLLM's static `CUSTOM` member (vLLM looks it up by name)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"


@dataclass(frozen=True)
class _Plans:
    """The two kernel wrappers of one sliding window (planned by each build())."""

    decode: PagedDecode
    prefill: PagedPrefill


@dataclass
class AttnBackendMetadata:
    num_actual_tokens: int  # tokens of the step, padding included
    slot_mapping: torch.Tensor  # for vLLM parts that read it (KV connectors); writes get theirs
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    query_start_loc: np.ndarray  # int64 [num_reqs + 1], host
    kv_lens: np.ndarray  # int64 [num_reqs], host: each request's KV, its new tokens included
    num_decodes: int  # the leading requests with at most one query token (decode kernel)
    plans: dict[int, _Plans] = field(repr=False)  # by window_left, planned for this batch
    # False: bidirectional blocks (DFlash drafts): each query sees all of its request's keys.
    # One query token sees them all either way, so only the prefill kernel's plan differs.
    causal: bool = True
    # The block-table rows of the decodes and of the rest, made once for all layers.
    decode_pages: PageTable | None = field(default=None, repr=False)
    prefill_pages: PageTable | None = field(default=None, repr=False)

    def __post_init__(self):
        nd, reqs = self.num_decodes, self.num_reqs
        if nd:
            self.decode_pages = PageTable.from_block_table(self.block_table[:nd])
        if nd < reqs:
            self.prefill_pages = PageTable.from_block_table(self.block_table[nd:reqs])

    @property
    def num_reqs(self) -> int:
        return len(self.kv_lens)

    @property
    def num_decode_tokens(self) -> int:
        return int(self.query_start_loc[self.num_decodes])


class AttnBackendMetadataBuilder(AttentionMetadataBuilder[AttnBackendMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if getattr(vllm_config.parallel_config, "use_ubatching", False):
            # Micro-batches are built together and run interleaved, possibly on two streams;
            # the plans live in one set of buffers per attention group.
            raise NotImplementedError(f"{BACKEND_NAME}: micro-batching (--enable-dbo, "
                                      "ubatch_size > 1) is not supported")
        check_dummy_requests_fit(vllm_config, BACKEND_NAME)
        # Speculative verification (1 + k tokens) is sorted to the front with the decodes,
        # so uniform verify batches are whole and capturable.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        model_config = vllm_config.model_config
        parallel_config = vllm_config.parallel_config
        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
        heads = {layer.impl.num_heads for layer in layers.values() if hasattr(layer, "impl")}
        self.num_qo_heads = heads.pop() if len(heads) == 1 else \
            model_config.get_num_attention_heads(parallel_config)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_size = kv_cache_spec.head_size
        self.head_size_v = getattr(kv_cache_spec, "head_size_v", None) or self.head_size
        self.dtype = model_config.dtype  # the queries' and outputs'
        # The group's layers name their cache's format (layers skipped by
        # --kv-cache-dtype-skip-layers say "auto"); without registered layers the config does.
        cache_strings = {layer.impl.kv_cache_dtype for layer in layers.values()
                         if hasattr(layer, "impl")}
        cache_string = cache_strings.pop() if len(cache_strings) == 1 else \
            vllm_config.cache_config.cache_dtype
        self.kv_dtype = kv_dtype_of(kv_cache_spec.dtype, cache_string)
        scheduler = vllm_config.scheduler_config
        self.max_num_reqs = scheduler.max_num_seqs
        self.max_num_tokens = scheduler.max_num_batched_tokens
        # Every window of the group's layers is planned in every build(), so forward only
        # launches and graph replays find their plans made. Without registered layers (a
        # group built directly) the spec's window is the group's.
        window_lefts = {window_left_of(getattr(layer.impl, "sliding_window", None))
                        for layer in layers.values() if hasattr(layer, "impl")}
        if not window_lefts:
            window_lefts = {window_left_of(getattr(kv_cache_spec, "sliding_window", None))}
        self._plans = {window_left: self._make_plans() for window_left in sorted(window_lefts)}

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AttnBackendMetadata:
        cm = common_attn_metadata
        if not isinstance(cm.causal, bool):
            raise NotImplementedError(f"{BACKEND_NAME}: per-request causality (a causal "
                                      "tensor) is not supported; causal must be True or False")
        num_reqs = cm.num_reqs
        query_start_loc = cm.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        kv_lens = host_kv_lens(cm, num_reqs, self.vllm_config)
        q_lens = np.diff(query_start_loc)
        longer = np.flatnonzero(q_lens > 1)
        num_decodes = int(longer[0]) if longer.size else num_reqs
        metadata = AttnBackendMetadata(
            num_actual_tokens=cm.num_actual_tokens, slot_mapping=cm.slot_mapping,
            block_table=cm.block_table_tensor, query_start_loc=query_start_loc, kv_lens=kv_lens,
            num_decodes=num_decodes, plans=self._plans, causal=cm.causal)
        for window_left, plans in self._plans.items():
            self._plan(plans, metadata, window_left)
        return metadata

    def _make_plans(self) -> _Plans:
        shape = dict(num_qo_heads=self.num_qo_heads, num_kv_heads=self.num_kv_heads,
                     head_dim=self.head_size, head_dim_vo=self.head_size_v, dtype=self.dtype,
                     kv_dtype=self.kv_dtype,
                     device=self.device, use_cuda_graph=True)
        # Graph-sized grids everywhere: a step may be replayed from a captured graph, and
        # the unused slots of a grid exit at once.
        return _Plans(decode=PagedDecode(max_batch_size=self.max_num_reqs, **shape),
                      prefill=PagedPrefill(max_batch_size=self.max_num_reqs,
                                           max_num_tokens=self.max_num_tokens, **shape))

    def _plan(self, plans: _Plans, metadata: AttnBackendMetadata, window_left: int) -> None:
        nd = metadata.num_decodes
        if nd:
            plans.decode.plan(metadata.kv_lens[:nd], window_left=window_left)
        if nd < metadata.num_reqs:
            qo = metadata.query_start_loc[nd:] - metadata.query_start_loc[nd]
            # The grid covers every token after the decodes, padding included, as at capture.
            grid_tokens = max(int(qo[-1]), metadata.num_actual_tokens - metadata.num_decode_tokens)
            plans.prefill.plan(qo, metadata.kv_lens[nd:], causal=metadata.causal,
                               window_left=window_left,
                               graph_num_tokens=min(grid_tokens, plans.prefill.max_num_tokens))


def check_dummy_requests_fit(vllm_config: VllmConfig, backend_name: str) -> None:
    """Refuse, at construction, a setting whose warm-up would fail mid-start-up.

    vLLM's model runner V2 warms up (profile run, FlashInfer's autotune) with a dummy batch of
    max_num_batched_tokens tokens split over at most max_num_seqs requests. Where that gives a
    request more keys than max_model_len, its block-table row (sized by max_model_len) cannot
    address them: the kernels would read past the table, so run() refuses the batch, which
    stops the engine in its warm-up (vLLM's TRITON_ATTN reads out of bounds there). Seen on
    the H200 with max_model_len 280, max_num_seqs 8 and max_num_batched_tokens 8192."""
    if not getattr(vllm_config, "use_v2_model_runner", False):
        return  # the V1 runner's dummy requests stay within max_model_len
    scheduler, model = vllm_config.scheduler_config, vllm_config.model_config
    if model is None:
        return
    tokens, requests = scheduler.max_num_batched_tokens, scheduler.max_num_seqs
    longest = -(-tokens // max(1, min(tokens, requests)))
    if longest > model.max_model_len:
        raise ValueError(
            f"{backend_name}: max_num_batched_tokens ({tokens}) over max_num_seqs ({requests}) "
            f"gives vLLM's model runner V2 warm-up requests of {longest} tokens, longer than "
            f"max_model_len ({model.max_model_len}), which the block table cannot hold; set "
            f"max_num_batched_tokens <= max_num_seqs x max_model_len "
            f"({requests * model.max_model_len}), or VLLM_USE_V2_MODEL_RUNNER=0")


def host_kv_lens(cm: CommonAttentionMetadata, num_reqs: int, vllm_config: VllmConfig) -> np.ndarray:
    """The first `num_reqs` requests' KV lengths on the host, for plan(): vLLM's exact host
    upper bound, except with speculation, where only the device knows how many drafts were
    kept (one copy to the host, which waits for the device)."""
    spec = vllm_config.speculative_config
    upper_bound = cm.seq_lens_cpu_upper_bound
    if upper_bound is not None and (spec is None or not spec.num_speculative_tokens):
        return upper_bound[:num_reqs].numpy().astype(np.int64)
    return cm.seq_lens[:num_reqs].cpu().numpy().astype(np.int64)


def kv_dtype_of(spec_dtype: torch.dtype, cache_dtype: str) -> torch.dtype:
    """The element type the kernels read: the format an FP8 cache-dtype string names (vLLM's
    engine keeps those caches as uint8 bytes, its spec's dtype; vLLM's own backend tests hand
    over float8 tensors under a 16-bit spec), else the spec's dtype."""
    if cache_dtype in fp8.ENGINE_FP8_STRINGS:
        return fp8.fp8_dtype(cache_dtype)
    if spec_dtype == torch.uint8:
        raise ValueError(f"{BACKEND_NAME}: a uint8 KV cache with kv_cache_dtype {cache_dtype!r}; "
                         f"accepted FP8 formats: {', '.join(fp8.ENGINE_FP8_STRINGS)}")
    return spec_dtype


def window_left_of(sliding_window) -> int:
    """vLLM's window counts the query's own token: w -> keys [p - (w - 1), p]; None -> -1."""
    if sliding_window is None:
        return -1
    if isinstance(sliding_window, (tuple, list)):  # already (left, right)
        return int(sliding_window[0])
    return int(sliding_window) - 1


class AttnBackendImpl(AttentionImpl[AttnBackendMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra_impl_args) -> None:
        unsupported = [name for name, value in extra_impl_args.items()
                       if value is not None and value is not False]
        if alibi_slopes is not None:
            unsupported.append("alibi_slopes")
        if unsupported:
            raise NotImplementedError(f"{BACKEND_NAME}: not supported: {sorted(unsupported)} "
                                      "(ALiBi, attention sinks and other extras)")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"{BACKEND_NAME}: attention type {attn_type!r}; "
                                      "supported: decoder")
        if kv_cache_dtype not in AttnBackend.supported_kv_cache_dtypes:
            raise ValueError(f"{BACKEND_NAME}: kv_cache_dtype {kv_cache_dtype!r}; accepted: "
                             f"{', '.join(AttnBackend.supported_kv_cache_dtypes)}")
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8_cache = kv_cache_dtype in fp8.ENGINE_FP8_STRINGS
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.sliding_window = sliding_window
        self.window_left = window_left_of(sliding_window)
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Writes the step's K/V rows at `slot_mapping` (slot -1: a padding token, skipped)."""
        if self.kv_sharing_target_layer_name is not None:
            return  # this layer reads another layer's cache, already written
        num_slots = slot_mapping.shape[0]  # key/value may carry graph padding past it
        write_kv(self._cache(layer, kv_cache), slot_mapping, key[:num_slots], value[:num_slots])

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttnBackendMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: fused output quantization is not "
                                      "supported")
        if attn_metadata is None:
            return output.fill_(0)  # the memory-profiling run
        meta = attn_metadata
        out = output.view(output.shape[0], self.num_heads, -1)
        cache = self._cache(layer, kv_cache)
        plans = meta.plans.get(self.window_left)
        if plans is None:
            raise RuntimeError(f"{BACKEND_NAME}: this layer's window (window_left "
                               f"{self.window_left}) is not among its attention group's "
                               f"({sorted(meta.plans)}); build() plans the group's windows")
        starts = meta.query_start_loc
        nd = meta.num_decodes
        soft_cap = self.logits_soft_cap
        if nd:
            plans.decode.run(query[:nd], cache, meta.decode_pages, sm_scale=self.scale,
                             logits_soft_cap=soft_cap, out=out[:nd])
        if nd < meta.num_reqs:
            first, last = int(starts[nd]), int(starts[-1])
            plans.prefill.run(query[first:last], cache, meta.prefill_pages, sm_scale=self.scale,
                              logits_soft_cap=soft_cap, out=out[first:last])
        return output

    def _cache(self, layer, kv_cache: torch.Tensor) -> PagedKVCache:
        if not self.fp8_cache:
            return PagedKVCache.from_vllm(kv_cache, self.head_size)
        # uint8 bytes (the engine's) or a float8 tensor, read as the string's format. Scales are
        # read at every call: vLLM re-registers the scale buffers after loading.
        return PagedKVCache.from_vllm(fp8.view_as_fp8(kv_cache, self.kv_cache_dtype),
                                      self.head_size, k_scale=layer._k_scale,
                                      v_scale=layer._v_scale)
