"""attn_backend as a vLLM V1 MLA backend (DeepSeek-V2/V3, Kimi-K2 class models).

vLLM's `MLAAttention` layer runs the model side of MLA (the q/kv projections, the absorbed
`W_UK_T` / `W_UV` products, the decode/prefill split of the batch); a backend supplies the
attention itself, in two forms:

- `forward_mqa` (decode, and speculative tokens, which sort with the decodes): the absorbed
  form over the latent cache `[num_blocks, block_size, 576]` (512 latent + 64 rope per
  token, one head), V = each row's first 512 columns. It runs `PagedPrefill` at head dims
  (576, 512), the latent kernel, planned in `build()` from host lengths into fixed buffers:
  ragged query lengths, causal placement, any block size, UNIFORM_BATCH CUDA graphs.
- `forward_mha` (prefill): the decompressed form, causal attention of the new tokens at head
  dims (192, 128) and, for requests with cached context, attention over that context in
  vLLM's workspace-sized chunks (gathered from the latent cache and up-projected with
  `kv_b_proj`), merged by log-sum-exp. `AttnBackendMLAPrefill` is our `MLAPrefillBackend`
  (vLLM's extension point for that kernel, registered as its `CUSTOM` member); the K/V of a
  call are one-token pages, so the kernel reads them where vLLM put them.

The builder takes our prefill backend unless `--attention-config` names another
`mla_prefill_backend`; then vLLM's own MHA path runs with that one. K/V rows are written by
our `paged_kv_write` kernel (latent to the first 512 columns, rope to the last 64: what
vLLM's `concat_and_cache_mla` stores). On CPU every wrapper runs the float reference.

FP8 latent caches (`fp8`, `fp8_e4m3`, `fp8_e5m2`): vLLM's uint8 cache is re-viewed by the
string; the one per-tensor `_k_scale` quantises the whole row on write (x / scale in float32,
rounded to nearest even, saturated: `concat_and_cache_mla`'s bytes) and is read by the latent
kernel at every call (a device tensor, so a captured graph reads the value it holds at
replay); the MHA prefill's context chunks are dequantised before their up-projection. The
queries stay in the model's dtype (`supports_quant_query_input` False).

Selection: `--attention-backend CUSTOM` (vLLM's static member resolves to this class for MLA
models, `custom.py`), or the name `ATTN_BACKEND_MLA` (a member added at registration: only where
vLLM forks its processes, see `custom.py`). Not served (refused when vLLM validates the
configuration or builds the impl, with the reason): the packed `fp8_ds_mla` rows and other
quantised formats, sparse MLA (DeepSeek-V3.2), decode/prefill context parallelism, sliding
windows, fused output quantisation, and dims other than 512 + 64 latent and 128 + 64 / 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention.mla_attention import (MLACommonBackend,
                                                                 MLACommonDecodeMetadata,
                                                                 MLACommonImpl,
                                                                 MLACommonMetadata,
                                                                 MLACommonMetadataBuilder,
                                                                 MLACommonPrefillMetadata,
                                                                 QueryLenSupport)
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.mla.prefill.base import MLADimensions, MLAPrefillBackend

from ... import fp8, reference
from ..._validation import KERNEL_DTYPES, MLA_HEAD_DIMS, MLA_MHA_HEAD_DIMS
from ...kv_write import write_latent_rows
from ...paged_kv import PagedKVCache, PageTable
from ...prefill import PagedPrefill
from . import MLA_BACKEND_NAME
from .backend import KernelCapabilities, check_dummy_requests_fit, host_kv_lens, kv_dtype_of

KV_LORA_RANK = MLA_HEAD_DIMS[1]  # 512
ROPE_DIM = MLA_HEAD_DIMS[0] - MLA_HEAD_DIMS[1]  # 64
NOPE_DIM = MLA_MHA_HEAD_DIMS[0] - ROPE_DIM  # 128
V_HEAD_DIM = MLA_MHA_HEAD_DIMS[1]  # 128


class AttnBackendMLA(KernelCapabilities, MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(KERNEL_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16",
                                                       *fp8.ENGINE_FP8_STRINGS]

    @staticmethod
    def get_name() -> str:
        return MLA_BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["AttnBackendMLAImpl"]:
        return AttnBackendMLAImpl

    @staticmethod
    def get_builder_cls() -> type["AttnBackendMLAMetadataBuilder"]:
        return AttnBackendMLAMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [MLA_HEAD_DIMS[0]]  # the latent row: 512 + 64

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]  # the kernels address any page size


class AttnBackendMLAAsCustom(AttnBackendMLA):
    """The same backend under vLLM's static `CUSTOM` member (`custom.Backend` for MLA models)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"


@dataclass
class AttnBackendMLAMetadata(MLACommonMetadata[MLACommonDecodeMetadata]):
    # The latent kernel planned for the decodes of this batch, and their block-table rows.
    latent: PagedPrefill | None = None
    latent_pages: PageTable | None = None
    latent_tokens: int = 0  # the decodes' query rows; forward_mqa's rows past them are padding


class AttnBackendMLAMetadataBuilder(MLACommonMetadataBuilder[AttnBackendMLAMetadata]):
    # A captured graph serves decode-only batches of one query length (1, or 1 + k
    # speculative tokens); mixed batches run eagerly or piecewise.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    # The latent kernel takes any query length per request, so speculative tokens of any mix
    # of lengths run as decodes.
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.VARLEN

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        if getattr(vllm_config.parallel_config, "use_ubatching", False):
            # Micro-batches are built together and run interleaved; the plans live in one
            # set of buffers per attention group.
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: micro-batching (--enable-dbo, "
                                      "ubatch_size > 1) is not supported")
        check_dummy_requests_fit(vllm_config, MLA_BACKEND_NAME)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device,
                         metadata_cls=AttnBackendMLAMetadata)
        if vllm_config.attention_config.mla_prefill_backend is None and \
                not isinstance(self._prefill_backend, AttnBackendMLAPrefill):
            # vLLM picked its platform default for the layers; this backend's prefill is ours.
            self._prefill_backend = AttnBackendMLAPrefill.like(self._prefill_backend)
        if isinstance(self._prefill_backend, AttnBackendMLAPrefill):
            self._prefill_backend.bind(device)  # its kernel's checks fail here, not mid-serving
        cache_string = getattr(kv_cache_spec, "cache_dtype_str", None) or \
            vllm_config.cache_config.cache_dtype
        self.kv_dtype = kv_dtype_of(kv_cache_spec.dtype, cache_string)
        scheduler = vllm_config.scheduler_config
        self.max_num_reqs = scheduler.max_num_seqs
        # Graph-sized grids: a decode step may be replayed from a captured graph, and the
        # unused slots of a grid exit at once.
        self._latent = PagedPrefill(
            num_qo_heads=self.num_heads, num_kv_heads=1, head_dim=MLA_HEAD_DIMS[0],
            head_dim_vo=MLA_HEAD_DIMS[1], dtype=self.model_config.dtype, kv_dtype=self.kv_dtype,
            device=device, max_batch_size=self.max_num_reqs,
            max_num_tokens=scheduler.max_num_batched_tokens, use_cuda_graph=True)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AttnBackendMLAMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or cm.causal is not True:
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: non-causal batches are not "
                                      "supported (causal must be True)")
        metadata = super().build(common_prefix_len, cm, fast_build)
        nd = metadata.num_decodes
        if nd:
            qo = cm.query_start_loc_cpu[: nd + 1].numpy().astype(np.int64)
            kv_lens = host_kv_lens(cm, nd, self.vllm_config)
            # vLLM counts a decode-only step's graph padding among the decode tokens (all of
            # them reach forward_mqa): the grid covers them, as at capture.
            self._latent.plan(qo, kv_lens, causal=True,
                              graph_num_tokens=max(metadata.num_decode_tokens, int(qo[-1])))
            metadata.latent = self._latent
            metadata.latent_tokens = int(qo[-1])
            metadata.latent_pages = PageTable.from_block_table(cm.block_table_tensor[:nd])
        return metadata


class AttnBackendMLAPrefill(MLAPrefillBackend):
    """The MHA prefill of MLA models on our kernel, at head dims (192, 128).

    `prepare_metadata` (in the builder, on the host) plans the new tokens (causal) and each
    context chunk (all keys) of the batch; the run methods take the K/V vLLM hands them as
    one-token pages (request after request, as vLLM lays them out) and return vLLM's forms:
    out [tokens, heads, 128], lse [heads, tokens] (natural log).
    """

    supported_mla_dimensions: ClassVar[list[MLADimensions]] = [
        MLADimensions(qk_nope_head_dim=NOPE_DIM, qk_rope_head_dim=ROPE_DIM,
                      v_head_dim=V_HEAD_DIM)]

    def __init__(self, num_heads: int, scale: float, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, vllm_config: VllmConfig) -> None:
        super().__init__(num_heads=num_heads, scale=scale, kv_lora_rank=kv_lora_rank,
                         qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                         v_head_dim=v_head_dim, vllm_config=vllm_config)
        dims = MLADimensions(qk_nope_head_dim=qk_nope_head_dim,
                             qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim)
        if not self.supports_mla_dimensions(dims) or kv_lora_rank != KV_LORA_RANK:
            raise ValueError(f"{MLA_BACKEND_NAME}: MLA dims {dims} with kv_lora_rank "
                             f"{kv_lora_rank}; supported: {self.supported_mla_dimensions[0]} "
                             f"with kv_lora_rank {KV_LORA_RANK}")
        self._new_tokens: PagedPrefill | None = None
        self._chunks: list[PagedPrefill] = []  # one per context chunk of the largest batch yet
        self._new_tokens_pages: PageTable | None = None
        self._chunk_pages: list[PageTable] = []

    @staticmethod
    def get_name() -> str:
        return MLA_BACKEND_NAME

    @classmethod
    def supports_compute_capability(cls, device_capability) -> bool:
        return KernelCapabilities.supports_compute_capability(device_capability)

    def supports_out(self) -> bool:
        return True

    @classmethod
    def like(cls, other: MLAPrefillBackend) -> "AttnBackendMLAPrefill":
        return cls(num_heads=other.num_heads, scale=other.scale,
                   kv_lora_rank=other.kv_lora_rank, qk_nope_head_dim=other.qk_nope_head_dim,
                   qk_rope_head_dim=other.qk_rope_head_dim, v_head_dim=other.v_head_dim,
                   vllm_config=other.vllm_config)

    def bind(self, device: torch.device) -> None:
        """Makes the new tokens' wrapper on `device` (the builder's)."""
        if self._new_tokens is None or self._new_tokens.device != device:
            self._new_tokens = self._make_wrapper(device)
            self._chunks = []

    def prepare_metadata(self, prefill_metadata: MLACommonPrefillMetadata) -> None:
        super().prepare_metadata(prefill_metadata)
        device = prefill_metadata.block_table.device
        q_lens = prefill_metadata.query_lens_cpu.numpy().astype(np.int64)
        self.bind(device)
        self._new_tokens.plan(_indptr(q_lens), q_lens, causal=True)
        self._new_tokens_pages = PageTable.over_rows(q_lens, device)
        chunked = prefill_metadata.chunked_context
        self._chunk_pages = []
        for chunk in chunked.chunks if chunked is not None else []:
            if len(self._chunks) <= chunk.index:
                self._chunks.append(self._make_wrapper(device))
            chunk_q_lens = q_lens[chunk.request_slice]
            kv_lens = chunk.seq_lens.numpy().astype(np.int64)
            self._chunks[chunk.index].plan(_indptr(chunk_q_lens), kv_lens, causal=False)
            self._chunk_pages.append(PageTable.over_rows(kv_lens, device))

    def _make_wrapper(self, device: torch.device) -> PagedPrefill:
        scheduler = self.vllm_config.scheduler_config
        dtype = self.vllm_config.model_config.dtype
        return PagedPrefill(num_qo_heads=self.num_heads, num_kv_heads=self.num_heads,
                            head_dim=self.qk_nope_head_dim + self.qk_rope_head_dim,
                            head_dim_vo=self.v_head_dim, dtype=dtype, device=device,
                            max_batch_size=scheduler.max_num_seqs,
                            max_num_tokens=scheduler.max_num_batched_tokens)

    def run_prefill_new_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               return_softmax_lse: bool, out: torch.Tensor | None = None,
                               output_scale: torch.Tensor | None = None):
        if output_scale is not None:
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: fused output quantisation is not "
                                      "supported")
        return self._run(self._new_tokens, self._new_tokens_pages, q, k, v, out,
                         return_softmax_lse)

    def run_prefill_context_chunk(self, chunk, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor | None = None):
        return self._run(self._chunks[chunk.index], self._chunk_pages[chunk.index], q, k, v,
                         out, True)

    def _run(self, wrapper: PagedPrefill | None, pages: PageTable, q, k, v, out, return_lse):
        if wrapper is None:
            raise RuntimeError(f"{MLA_BACKEND_NAME}: the prefill runs before prepare_metadata "
                               "planned its batch")
        result = wrapper.run(q, PagedKVCache.from_token_rows(k, v), pages, sm_scale=self.scale,
                             out=out, return_lse=return_lse)
        if not return_lse:
            return result
        out, lse = result
        return out, lse.transpose(0, 1)  # vLLM's [heads, tokens]


class AttnBackendMLAImpl(MLACommonImpl[AttnBackendMLAMetadata]):
    can_return_lse_for_decode: bool = False  # the LSE serves DCP only, which is not supported
    supports_pcp: bool = False
    supports_dcp: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap,
                 attn_type: str, kv_sharing_target_layer_name, **mla_args) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, **mla_args)
        unsupported = [name for name, value in (("alibi_slopes", alibi_slopes),
                                                ("sliding_window", sliding_window),
                                                ("logits_soft_cap", logits_soft_cap),
                                                ("indexer (sparse MLA)", self.indexer),
                                                ("q_pad_num_heads", self.q_pad_num_heads))
                       if value]
        if unsupported:
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: not supported: {unsupported}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: attention type {attn_type!r}; "
                                      "supported: decoder")
        if kv_cache_dtype not in AttnBackendMLA.supported_kv_cache_dtypes:
            raise ValueError(f"{MLA_BACKEND_NAME}: kv_cache_dtype {kv_cache_dtype!r}; "
                             f"accepted: {', '.join(AttnBackendMLA.supported_kv_cache_dtypes)}")
        self.fp8_cache = kv_cache_dtype in fp8.ENGINE_FP8_STRINGS
        if self.dcp_world_size > 1:
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: decode context parallelism is "
                                      "not supported")
        dims = (self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim,
                self.v_head_dim)
        if dims != (KV_LORA_RANK, ROPE_DIM, NOPE_DIM, V_HEAD_DIM) or \
                head_size != MLA_HEAD_DIMS[0]:
            raise ValueError(f"{MLA_BACKEND_NAME}: MLA dims (kv_lora_rank, rope, nope, v) = "
                             f"{dims}, head size {head_size}; supported: "
                             f"({KV_LORA_RANK}, {ROPE_DIM}, {NOPE_DIM}, {V_HEAD_DIM}), "
                             f"{MLA_HEAD_DIMS[0]}")
        self.supports_quant_query_input = False  # queries stay in the model's dtype

    def do_kv_cache_update(self, kv_c_normed: torch.Tensor, k_pe: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                           kv_cache_dtype: str, k_scale: torch.Tensor,
                           skip_scale: bool = False) -> None:
        """Writes each token's latent row (slot -1: a padding token, skipped); an FP8 cache
        stores it quantised with `k_scale` (the row's one scale)."""
        if kv_cache.numel() == 0:
            return  # the memory-profiling run
        num_slots = slot_mapping.shape[0]  # the inputs may carry graph padding past it
        latent = kv_c_normed[:num_slots].reshape(num_slots, 1, self.kv_lora_rank)
        rope = k_pe[:num_slots].reshape(num_slots, 1, self.qk_rope_head_dim)
        kv_cache, scale = self._rows_and_scale(kv_cache, k_scale)
        write_latent_rows(kv_cache.unsqueeze(2), slot_mapping.flatten(), latent, rope,
                          scale=scale)

    def _rows_and_scale(self, kv_cache: torch.Tensor, k_scale: torch.Tensor):
        """The cache as its rows' element type (FP8 bytes re-viewed by the string) and the scale
        that applies to them (None for a 16-bit cache)."""
        if not self.fp8_cache:
            return kv_cache, None
        return fp8.view_as_fp8(kv_cache, self.kv_cache_dtype), k_scale

    def _latent_cache(self, kv_cache: torch.Tensor, layer) -> PagedKVCache:
        """The layer's latent cache, with the layer's `_k_scale` read at every call (vLLM
        re-registers the scale buffers after loading)."""
        rows, scale = self._rows_and_scale(kv_cache, layer._k_scale)
        return PagedKVCache.from_vllm_mla(rows, self.kv_lora_rank, scale=scale)

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor,
                    attn_metadata: AttnBackendMLAMetadata, layer):
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        meta = attn_metadata
        if meta.latent is None:
            raise RuntimeError(f"{MLA_BACKEND_NAME}: forward_mqa without a planned decode "
                               "batch (build() plans the decodes)")
        cache = self._latent_cache(kv_c_and_k_pe_cache, layer)
        # Padding rows (a padded graph step) get zeros: they flow through the rest of the
        # layer like real rows, and are dropped at the end of the step.
        out = q.new_empty(q.shape[0], self.num_heads, self.kv_lora_rank)
        rows = meta.latent_tokens
        out[rows:].zero_()
        meta.latent.run(q[:rows], cache, meta.latent_pages, sm_scale=self.scale, out=out[:rows])
        return out, None

    def forward_mha(self, q: torch.Tensor, kv_c_normed: torch.Tensor, k_pe: torch.Tensor,
                    kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: AttnBackendMLAMetadata,
                    k_scale: torch.Tensor, output: torch.Tensor,
                    output_scale: torch.Tensor | None = None) -> None:
        prefill = attn_metadata.prefill
        runner = prefill.prefill_backend
        if not isinstance(runner, AttnBackendMLAPrefill):
            # A prefill backend the user chose: vLLM's own MHA path with it.
            return super().forward_mha(q, kv_c_normed, k_pe, kv_c_and_k_pe_cache,
                                       attn_metadata, k_scale, output, output_scale)
        if output_scale is not None:
            raise NotImplementedError(f"{MLA_BACKEND_NAME}: fused output quantisation is not "
                                      "supported")
        out = output.view(-1, self.num_heads, self.v_head_dim)
        k, v = self._decompress(kv_c_normed, k_pe)
        if prefill.chunked_context is None:
            runner.run_prefill_new_tokens(q, k, v, return_softmax_lse=False, out=out)
            return
        new_out, new_lse = runner.run_prefill_new_tokens(q, k, v, return_softmax_lse=True)
        context_out, context_lse = self._context_attention(q, kv_c_and_k_pe_cache, prefill,
                                                           runner, k_scale)
        merged = reference.merge_states(context_out, context_lse, new_out.float(),
                                        new_lse.transpose(0, 1))
        out.copy_(merged.out)

    def _decompress(self, kv_c_normed: torch.Tensor, k_pe: torch.Tensor):
        """Per-head K [T, H, 192] (nope from kv_b_proj, the shared rope part) and V [T, H, 128]."""
        kv_nope = self.kv_b_proj(kv_c_normed)[0].view(-1, self.num_heads,
                                                      self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv_nope.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        rope = k_pe.reshape(-1, 1, self.qk_rope_head_dim).expand(-1, self.num_heads, -1)
        return torch.cat([k_nope, rope], dim=-1), v

    def _context_attention(self, q: torch.Tensor, kv_cache: torch.Tensor,
                           prefill: MLACommonPrefillMetadata, runner: AttnBackendMLAPrefill,
                           k_scale: torch.Tensor):
        """Attention of the prefill tokens over their cached context, chunk by chunk (vLLM
        sizes the chunks to its workspace), as float32 (out, lse [tokens, heads]); a token
        without context keeps lse -inf, the identity of the merge. FP8 rows are dequantised
        (value = stored * k_scale) into the queries' dtype before the up-projection."""
        num_tokens = q.shape[0]
        out = torch.zeros(num_tokens, self.num_heads, self.v_head_dim, dtype=torch.float32,
                          device=q.device)
        lse = torch.full((num_tokens, self.num_heads), float("-inf"), dtype=torch.float32,
                         device=q.device)
        # FP8 rows are gathered as their bytes (index ops on float8 tensors are not
        # implemented everywhere).
        source = kv_cache.view(torch.uint8) if self.fp8_cache else kv_cache
        for chunk in prefill.chunked_context.chunks:
            rows = _gather_context_rows(source, prefill.block_table, chunk)
            if self.fp8_cache:  # device ops only: the scale is not read on the host
                rows = fp8.dequantize(fp8.view_as_fp8(rows, self.kv_cache_dtype),
                                      k_scale.float().reshape(1), q.dtype)
            k, v = self._decompress(rows[:, : self.kv_lora_rank].contiguous(),
                                    rows[:, self.kv_lora_rank:])
            chunk_out, chunk_lse = runner.run_prefill_context_chunk(chunk, q[chunk.token_slice],
                                                                    k, v)
            tokens = chunk.token_slice
            merged = reference.merge_states(out[tokens], lse[tokens], chunk_out.float(),
                                            chunk_lse.transpose(0, 1))
            out[tokens], lse[tokens] = merged.out, merged.lse
        return out, lse


def _gather_context_rows(kv_cache: torch.Tensor, block_table: torch.Tensor,
                         chunk: MLACommonPrefillMetadata.ContextChunk) -> torch.Tensor:
    """The latent rows [chunk tokens, 576] of a context chunk, request after request: token t
    of the chunk is position starts[r] + (t - cu_seq_lens[r]) of its request r. Device ops only
    (no synchronisation); vLLM's chunk tensors are already on the device."""
    block_size = kv_cache.shape[1]
    request = chunk.token_to_seq.long()
    token = torch.arange(chunk.num_context_tokens, device=kv_cache.device)
    position = token - chunk.cu_seq_lens.long()[request] + chunk.starts.long()[request]
    pages = block_table[chunk.request_slice].long()[request, position // block_size]
    return kv_cache[pages, position % block_size]


def _indptr(lens: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
