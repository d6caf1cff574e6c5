"""vLLM's MLA path with attn_backend: vLLM's own `MLAAttention` layer, built on our backend.

Each case builds a real `MLAAttention` (DeepSeek-V2 dims: latent 512 + rope 64, nope 128,
v 128) with a random `kv_b_proj`, lets vLLM absorb it (`process_weights_after_loading`),
and runs a batch the way vLLM's runner hands it over: our builder's metadata from
`CommonAttentionMetadata` over a shuffled block table, the new latent rows written through
the layer's `update_kv_cache`, then `forward_impl`, which splits the batch into our
`forward_mqa` (decodes, speculative tokens) and `forward_mha` (prefills, with cached context in
vLLM's workspace chunks). The expectation is dense attention written here from MLA's
definition (K and V decompressed per head from each token's latent row). On CPU the backend
runs the float reference; on a GPU its kernels.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
vllm = pytest.importorskip("vllm", reason="vllm is not installed")

from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,  # noqa: E402
                         SchedulerConfig, SpeculativeConfig, VllmConfig,
                         set_current_vllm_config)
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionType,  # noqa: E402
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from attn_backend.integrations import vllm as integration  # noqa: E402
from attn_backend.integrations.vllm import mla  # noqa: E402

HEADS, RANK, ROPE, NOPE, V_DIM = 8, 512, 64, 128, 128
SCALE = 1 / math.sqrt(NOPE + ROPE)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _devices():
    return [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES]


@pytest.fixture(autouse=True)
def _no_pinned_memory_without_a_gpu(monkeypatch):
    """vLLM decides at import whether to pin host buffers; with no platform detected (this CPU
    machine without vLLM's CPU build) it answers yes, and pinning needs a driver."""
    if not torch.cuda.is_available():
        import sys

        for name, module in list(sys.modules.items()):
            if name.startswith("vllm") and getattr(module, "PIN_MEMORY", None) is True:
                monkeypatch.setattr(module, "PIN_MEMORY", False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import DeepseekV2Config

    path = tmp_path_factory.mktemp("tiny_deepseek")
    DeepseekV2Config(hidden_size=256, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                     num_hidden_layers=1, intermediate_size=256, moe_intermediate_size=64,
                     n_routed_experts=4, first_k_dense_replace=1, vocab_size=512,
                     max_position_embeddings=8192, kv_lora_rank=RANK, q_lora_rank=None,
                     qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V_DIM,
                     torch_dtype="bfloat16").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tensor_parallel_group(model_dir):
    """vLLM's linear layers need its (here one-process) model-parallel groups."""
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(_vllm_config(model_dir, "cpu")):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1)
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


def _vllm_config(model_dir, device, *, num_speculative_tokens=0, max_model_len=8192,
                 max_num_seqs=64, block_size=16, mla_prefill_backend=None,
                 cache_dtype="auto") -> VllmConfig:
    from vllm.config.attention import AttentionConfig

    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=max_model_len)
    parallel = ParallelConfig()
    speculative = None
    if num_speculative_tokens:
        speculative = SpeculativeConfig(method="ngram",
                                        num_speculative_tokens=num_speculative_tokens,
                                        prompt_lookup_max=4, prompt_lookup_min=2,
                                        target_model_config=model,
                                        target_parallel_config=parallel)
    return VllmConfig(model_config=model,
                      cache_config=CacheConfig(block_size=block_size, cache_dtype=cache_dtype),
                      # within what vLLM's V2 runner's warm-up needs (check_dummy_requests_fit)
                      scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs,
                                                       max_num_batched_tokens=min(
                                                           8192, max_num_seqs * max_model_len),
                                                       max_model_len=max_model_len,
                                                       is_encoder_decoder=False),
                      device_config=DeviceConfig(device=device), parallel_config=parallel,
                      speculative_config=speculative,
                      attention_config=AttentionConfig(mla_prefill_backend=mla_prefill_backend))


LAYER = "model.layers.0.self_attn.attn"


class Model:
    """One real MLAAttention layer on our backend, with our builder for its group."""

    def __init__(self, vllm_config: VllmConfig, device: str, prefill_backend_cls=None, seed=0):
        from vllm.model_executor.layers.attention.mla_attention import MLAAttention
        from vllm.model_executor.layers.linear import ColumnParallelLinear

        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        with set_current_vllm_config(vllm_config):
            kv_b_proj = ColumnParallelLinear(RANK, HEADS * (NOPE + V_DIM), bias=False,
                                             params_dtype=torch.bfloat16)
            kv_b_proj.weight.data.copy_(
                torch.randn(kv_b_proj.weight.shape, generator=gen) / math.sqrt(RANK))
            self.layer = MLAAttention(
                num_heads=HEADS, scale=SCALE, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
                v_head_dim=V_DIM, q_lora_rank=None, kv_lora_rank=RANK, kv_b_proj=kv_b_proj,
                cache_config=vllm_config.cache_config, prefix=LAYER,
                attn_backend=mla.AttnBackendMLA,
                prefill_backend_cls=prefill_backend_cls or mla.AttnBackendMLAPrefill)
            self.layer.to(self.device)
            self.layer.process_weights_after_loading(torch.bfloat16)
            spec = self.layer.get_kv_cache_spec(vllm_config)
            self.builder = mla.AttnBackendMLA.get_builder_cls()(spec, [LAYER], vllm_config,
                                                                 self.device)
        self.vllm_config = vllm_config
        weight = kv_b_proj.weight.detach().float().cpu().view(HEADS, NOPE + V_DIM, RANK)
        self.w_k, self.w_v = weight[:, :NOPE], weight[:, NOPE:]  # [H, 128, 512] each

    def step(self, batch: "Batch", metadata=None):
        with set_current_vllm_config(self.vllm_config):
            md = self.builder.build(0, metadata or batch.metadata())
            layer = self.layer
            layer.update_kv_cache(batch.new_latent, batch.new_rope, batch.kv_cache,
                                  batch.slot_mapping, md, layer.kv_cache_dtype, layer._k_scale)
            output = torch.full((batch.num_tokens, HEADS * V_DIM), float("nan"),
                                dtype=torch.bfloat16, device=self.device)  # poisoned
            layer.forward_impl(batch.query, batch.new_latent, batch.new_rope, batch.kv_cache,
                               md, output)
        return md, output

    def expected(self, batch: "Batch", num_decodes: int | None = None) -> torch.Tensor:
        """Dense causal attention with each key's per-head K = [W_K c, k_pe], V = W_V c, over
        the values the cache holds; with `num_decodes`, the prefills (the later requests)
        see their new tokens as given (vLLM's MHA path decompresses those from its inputs,
        not from the cache: it matters for FP8 caches)."""
        outs, start = [], 0
        for r, (q_len, kv_len) in enumerate(zip(batch.q_lens, batch.kv_lens)):
            q = batch.query[start:start + q_len].float().cpu()
            start += q_len
            latent, rope = batch.latent_held[r].clone(), batch.rope_held[r].clone()
            if num_decodes is not None and r >= num_decodes:
                latent[kv_len - q_len:] = batch.latent[r][kv_len - q_len:].float()
                rope[kv_len - q_len:] = batch.rope[r][kv_len - q_len:].float()
            k = torch.cat([torch.einsum("hdc,kc->khd", self.w_k, latent),
                           rope[:, None, :].expand(-1, HEADS, -1)], dim=-1)
            v = torch.einsum("hdc,kc->khd", self.w_v, latent)
            scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
            visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len,
                                                                    kv_len)[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        return torch.cat(outs).reshape(-1, HEADS * V_DIM)


class Batch:
    """Random latent histories in a shuffled paged cache (block 0 is vLLM's null block), and
    the step's new tokens (the last q_len of each history) with their queries."""

    def __init__(self, q_lens, kv_lens, *, block_size, device, seed=0, pad_reqs=0,
                 pad_tokens=0, num_blocks=None, fp8_format=None, fp8_scale=1.0):
        """`fp8_format` (a float8 dtype): the cache is vLLM's uint8 bytes of that format,
        stored = value / fp8_scale; `latent_held` / `rope_held` are the values it holds."""
        gen = torch.Generator().manual_seed(seed)
        self.q_lens, self.kv_lens, self.device = list(q_lens), list(kv_lens), device
        blocks_per_req = [-(-n // block_size) for n in kv_lens]
        num_blocks = max(num_blocks or 0, sum(blocks_per_req) + 4)
        order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        self.block_table = torch.zeros(len(q_lens) + pad_reqs, max(blocks_per_req) + 2,
                                       dtype=torch.int32)
        cursor = 0
        for r, n in enumerate(blocks_per_req):
            self.block_table[r, :n] = torch.tensor(order[cursor:cursor + n], dtype=torch.int32)
            cursor += n
        self.kv_cache = torch.randn(num_blocks, block_size, RANK + ROPE,
                                    generator=gen).to(torch.bfloat16)  # stale rows
        self.latent = [torch.randn(n, RANK, generator=gen).to(torch.bfloat16) for n in kv_lens]
        self.rope = [torch.randn(n, ROPE, generator=gen).to(torch.bfloat16) for n in kv_lens]
        self.fp8_format, self.fp8_scale = fp8_format, fp8_scale
        self.latent_held = [self._held(x) for x in self.latent]
        self.rope_held = [self._held(x) for x in self.rope]
        if fp8_format is not None:
            self.kv_cache = self._stored(self.kv_cache.float()).view(torch.uint8)
        slots = []
        for r, (q, n) in enumerate(zip(q_lens, kv_lens)):
            for t in range(n - q, n):  # written by the step
                slots.append(int(self.block_table[r, t // block_size]) * block_size
                             + t % block_size)
        self.write_history(self.kv_cache)
        self.num_tokens = sum(q_lens) + pad_tokens
        self.slot_mapping = torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int64)
        pad_latent = torch.randn(pad_tokens, RANK, generator=gen).to(torch.bfloat16)
        pad_rope = torch.randn(pad_tokens, ROPE, generator=gen).to(torch.bfloat16)
        self.new_latent = torch.cat([c[n - q:] for c, q, n in zip(self.latent, q_lens, kv_lens)]
                                    + [pad_latent])
        self.new_rope = torch.cat([p[n - q:] for p, q, n in zip(self.rope, q_lens, kv_lens)]
                                  + [pad_rope])[:, None, :]  # vLLM's [tokens, 1, rope]
        self.query = torch.randn(self.num_tokens, HEADS, NOPE + ROPE,
                                 generator=gen).to(torch.bfloat16)
        starts = [0]
        for q in list(q_lens) + [0] * pad_reqs:
            starts.append(starts[-1] + q)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32)
        self.seq_lens = torch.tensor(list(kv_lens) + [0] * pad_reqs, dtype=torch.int32)
        for name in ("block_table", "kv_cache", "query", "slot_mapping", "new_latent",
                     "new_rope"):
            setattr(self, name, getattr(self, name).to(device))

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """x as the FP8 cache stores it: x / scale rounded to nearest even, saturated."""
        largest = torch.finfo(self.fp8_format).max
        return (x.float() / self.fp8_scale).clamp(-largest, largest).to(self.fp8_format)

    def _held(self, x: torch.Tensor) -> torch.Tensor:
        """The float values the cache holds for x."""
        if self.fp8_format is None:
            return x.float()
        return self._stored(x).float() * self.fp8_scale

    def write_history(self, kv_cache: torch.Tensor) -> None:
        """Every token but the step's new ones, as if earlier steps had cached them."""
        block_size = kv_cache.shape[1]
        for r, (q, n) in enumerate(zip(self.q_lens, self.kv_lens)):
            t = torch.arange(n - q)
            pages = self.block_table[r].cpu()[t // block_size].long()
            rows = torch.cat([self.latent[r][: n - q], self.rope[r][: n - q]], dim=-1)
            if self.fp8_format is not None:
                rows = self._stored(rows).view(torch.uint8)
            kv_cache[pages.to(kv_cache.device), (t % block_size).to(kv_cache.device)] = \
                rows.to(kv_cache.device)

    def metadata(self) -> CommonAttentionMetadata:
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc.to(self.device),
            query_start_loc_cpu=self.query_start_loc,
            seq_lens=self.seq_lens.to(self.device), num_reqs=len(self.seq_lens),
            num_actual_tokens=self.num_tokens, max_query_len=max(self.q_lens),
            max_seq_len=max(self.kv_lens), block_table_tensor=self.block_table,
            slot_mapping=self.slot_mapping, causal=True,
            seq_lens_cpu_upper_bound=self.seq_lens.clone())


def _check(model: Model, batch: Batch, output: torch.Tensor, num_decodes: int | None = None):
    real = sum(batch.q_lens)
    torch.testing.assert_close(output[:real].float().cpu(), model.expected(batch, num_decodes),
                               atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def models(model_dir, tensor_parallel_group):
    cache = {}

    def get(device, **config):
        key = (device, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = Model(_vllm_config(model_dir, device, **config), device)
        return cache[key]

    return get


# ---- registration and capabilities ----------------------------------------------------------

def test_register_adds_the_mla_backend_and_our_prefill():
    from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum

    integration.register()
    integration.register()  # idempotent: every vLLM process calls it
    member = AttentionBackendEnum[integration.MLA_BACKEND_NAME]
    assert member.get_class() is mla.AttnBackendMLA
    assert AttentionBackendEnum[mla.AttnBackendMLA.get_name()] is member  # looked up by name
    assert MLAPrefillBackendEnum.CUSTOM.get_class() is mla.AttnBackendMLAPrefill
    from vllm.config.attention import AttentionConfig

    config = AttentionConfig(backend_per_kind={"mla_attention": "attn_backend_mla"},
                             mla_prefill_backend="custom")
    assert config.backend_per_kind["mla_attention"] is member
    assert config.mla_prefill_backend is MLAPrefillBackendEnum.CUSTOM


def _validate(**overrides):
    args = dict(head_size=576, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
                use_mla=True, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                attn_type=AttentionType.DECODER)
    args.update(overrides)
    return mla.AttnBackendMLA.validate_configuration(**args)


@pytest.mark.parametrize("overrides", [{}, {"dtype": torch.float16}, {"block_size": 1},
                                       {"block_size": 7}, {"block_size": 64},
                                       {"block_size": 128}, {"kv_cache_dtype": "bfloat16"},
                                       {"kv_cache_dtype": "fp8"}, {"kv_cache_dtype": "fp8_e4m3"},
                                       {"kv_cache_dtype": "fp8_e5m2"},
                                       {"device_capability": DeviceCapability(8, 0)}])
def test_validate_configuration_accepts_what_the_kernels_serve(overrides):
    assert _validate(**overrides) == []


@pytest.mark.parametrize("overrides, reason", [
    ({"head_size": 320}, "head_size not supported"),
    ({"dtype": torch.float32}, "dtype not supported"),
    ({"kv_cache_dtype": "fp8_ds_mla"}, "kv_cache_dtype not supported"),
    ({"use_mla": False}, "non-MLA not supported"),
    ({"use_sparse": True}, "sparse not supported"),
    ({"device_capability": DeviceCapability(7, 5)}, "compute capability not supported"),
    ({"use_dcp": True}, "DCP not supported"),
    ({"use_pcp": True}, "PCP not supported"),
    ({"use_adaptive_verification": True}, "device-cpu query lens mismatch"),
])
def test_validate_configuration_names_what_it_rejects(overrides, reason):
    reasons = _validate(**overrides)
    assert any(reason in r for r in reasons), reasons


def test_prefill_backend_takes_deepseek_dims_only():
    from vllm.v1.attention.backends.mla.prefill.base import MLADimensions
    from vllm.v1.attention.backends.mla.prefill.selector import MLAPrefillSelectorConfig

    def reasons(nope, rope, v):
        config = MLAPrefillSelectorConfig(dtype=torch.bfloat16, mla_dimensions=MLADimensions(
            qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v))
        return mla.AttnBackendMLAPrefill.validate_configuration(DeviceCapability(9, 0), config)

    assert reasons(128, 64, 128) == []
    assert any("MLA dimensions" in r for r in reasons(192, 64, 256))


def test_builder_sorts_speculative_tokens_with_the_decodes(models):
    model = models("cpu", num_speculative_tokens=3)
    builder = model.builder
    assert builder.get_cudagraph_support(builder.vllm_config, builder.kv_cache_spec) == \
        AttentionCGSupport.UNIFORM_BATCH
    assert builder.reorder_batch_threshold == 4
    assert isinstance(builder._prefill_backend, mla.AttnBackendMLAPrefill)


@pytest.mark.parametrize("impl_kwargs, match", [
    ({"kv_cache_dtype": "fp8_ds_mla"}, "kv_cache_dtype 'fp8_ds_mla'"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"logits_soft_cap": 30.0}, "logits_soft_cap"),
    ({"kv_lora_rank": 256}, "MLA dims"),
])
def test_impl_refuses_what_it_does_not_serve(model_dir, impl_kwargs, match):
    args = dict(num_heads=HEADS, head_size=RANK + ROPE, scale=SCALE, num_kv_heads=1,
                alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto",
                logits_soft_cap=None, attn_type=AttentionType.DECODER,
                kv_sharing_target_layer_name=None, q_lora_rank=None, kv_lora_rank=RANK,
                qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, qk_head_dim=NOPE + ROPE,
                v_head_dim=V_DIM, kv_b_proj=None)
    args.update(impl_kwargs)
    with set_current_vllm_config(_vllm_config(model_dir, "cpu")), \
            pytest.raises((ValueError, NotImplementedError), match=match):
        mla.AttnBackendMLAImpl(**args)


# ---- correctness ----------------------------------------------------------------------------

BATCHES = {
    "decode": ([1] * 5, [1, 17, 300, 1000, 2048]),
    "prefill": ([300, 33, 1], [300, 33, 1]),
    "mixed": ([1, 1, 40, 7], [90, 1500, 100, 7]),  # one prefill with context, one without
    "context": ([64, 17, 5], [1000, 17, 200]),  # prefills over cached context
}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("name", list(BATCHES))
def test_batches_against_dense_mla(models, device, block_size, name):
    q_lens, kv_lens = BATCHES[name]
    model = models(device, block_size=block_size)
    batch = Batch(q_lens, kv_lens, block_size=block_size, device=device, seed=block_size)
    md, output = model.step(batch)
    assert md.num_decodes == next((i for i, q in enumerate(q_lens) if q > 1), len(q_lens))
    assert (md.prefill is not None and md.prefill.chunked_context is not None) == \
        (name in ("context", "mixed"))
    _check(model, batch, output)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("name", ["decode", "mixed", "context"])
def test_fp8_latent_caches(models, device, cache_dtype, name):
    """--kv-cache-dtype fp8 / fp8_e5m2: vLLM's uint8 cache holds the rows quantised with the
    layer's k_scale (our write, concat_and_cache_mla's bytes), the latent kernel reads them with
    the scale, and the prefill's context chunks are dequantised before the up-projection."""
    q_lens, kv_lens = BATCHES[name]
    model = models(device, cache_dtype=cache_dtype)
    fmt = torch.float8_e5m2 if cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    scale = 0.25
    model.layer._k_scale.fill_(scale)
    model.layer._k_scale_float = scale
    assert model.builder.kv_dtype == fmt
    batch = Batch(q_lens, kv_lens, block_size=16, device=device, seed=21, fp8_format=fmt,
                  fp8_scale=scale)
    md, output = model.step(batch)
    _check(model, batch, output, md.num_decodes)
    # The step's new rows hold exactly the bytes vLLM's writer stores: x / scale in float32.
    new_rows = torch.cat([batch.new_latent, batch.new_rope[:, 0]], dim=-1).cpu()
    slots = batch.slot_mapping.cpu()
    stored = batch.kv_cache.cpu().view(-1, RANK + ROPE)[slots]
    assert torch.equal(stored, batch._stored(new_rows).view(torch.uint8))


@pytest.mark.parametrize("device", _devices())
def test_speculative_tokens_of_mixed_lengths_run_as_decodes(models, device):
    """VARLEN: verify rows of 4, 2 and 1 tokens all take the latent kernel, causal within."""
    model = models(device, num_speculative_tokens=3)
    batch = Batch([4, 2, 4, 1, 120], [4, 900, 77, 3000, 500], block_size=16, device=device,
                  seed=3)
    md, output = model.step(batch)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (4, 11, 1)
    _check(model, batch, output)


@pytest.mark.parametrize("device", _devices())
def test_context_larger_than_the_workspace_runs_in_chunks(models, device):
    """vLLM's context workspace here holds 2048 rows: ten 250-token contexts take two chunks,
    one request split across them; every chunk's partial result is merged."""
    model = models(device, max_model_len=256, max_num_seqs=16)
    assert model.builder.chunked_prefill_workspace_size == 2048
    batch = Batch([6] * 10, [256] * 10, block_size=16, device=device, seed=5)
    md, output = model.step(batch)
    chunks = md.prefill.chunked_context.chunks
    assert len(chunks) == 2 and chunks[1].is_continuation
    _check(model, batch, output)


@pytest.mark.parametrize("device", _devices())
def test_graph_padding_rows_are_written_nowhere(models, device):
    """A padded decode step (requests with no tokens, slot -1 rows): the real rows are right
    and the padding writes no cache row."""
    model = models(device)
    batch = Batch([1, 1, 1], [40, 700, 5], block_size=16, device=device, seed=9, pad_reqs=2,
                  pad_tokens=3)
    before = batch.kv_cache.clone()
    md, output = model.step(batch)
    changed = (batch.kv_cache != before).any(-1).nonzero().tolist()
    written = {tuple(divmod(int(s), 16)) for s in batch.slot_mapping.tolist() if s >= 0}
    assert {tuple(x) for x in changed} <= written
    _check(model, batch, output)


def test_a_chosen_prefill_backend_runs_through_vllms_own_path(model_dir,
                                                              tensor_parallel_group):
    """With --attention-config mla_prefill_backend set to another backend, the layers keep
    it and vLLM's own forward_mha runs it (vLLM's CPU SDPA backend here)."""
    from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend
    from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum

    config = _vllm_config(model_dir, "cpu", mla_prefill_backend=MLAPrefillBackendEnum.CPU)
    model = Model(config, "cpu", prefill_backend_cls=CPUSDPAMLAPrefillBackend)
    assert isinstance(model.builder._prefill_backend, CPUSDPAMLAPrefillBackend)
    batch = Batch([1, 50, 9], [300, 50, 9], block_size=16, device="cpu", seed=11)
    _, output = model.step(batch)
    _check(model, batch, output)


# ---- CUDA graphs ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("q_len, cache_dtype", [(1, "auto"), (3, "auto"), (1, "fp8"),
                                                (3, "fp8_e5m2")])
def test_cuda_graph_capture_and_replay(models, q_len, cache_dtype):
    """Capture a uniform decode (or verify) step once, the latent write and the layer's
    forward_impl, then replay it with other lengths, block tables and padding, as vLLM's FULL
    graphs do (build() re-plans outside the graph before each replay). FP8: the layer's
    k_scale changes after capture, as vLLM's loading replaces it; replays read the new one."""
    device, reqs, block_size = "cuda", 8, 16
    model = models(device, num_speculative_tokens=q_len - 1, cache_dtype=cache_dtype)
    fp8 = None if cache_dtype == "auto" else \
        (torch.float8_e5m2 if cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn)
    model.layer._k_scale.fill_(1.0)
    capture = Batch([q_len] * reqs, [q_len + 40] * reqs, block_size=block_size, device=device,
                    num_blocks=2000, fp8_format=fp8)
    static = {name: getattr(capture, name).clone() for name in
              ("query", "new_latent", "new_rope", "slot_mapping")}
    static["block_table"] = torch.zeros(reqs, 200, dtype=torch.int32, device=device)
    static["block_table"][:, :capture.block_table.shape[1]] = capture.block_table
    kv_cache = capture.kv_cache
    output = torch.empty(reqs * q_len, HEADS * V_DIM, dtype=torch.bfloat16, device=device)
    layer = model.layer

    def metadata_of(batch: Batch):
        md = batch.metadata()
        md.block_table_tensor = static["block_table"]
        md.slot_mapping = static["slot_mapping"]
        return md

    def step(md):
        layer.update_kv_cache(static["new_latent"], static["new_rope"], kv_cache,
                              static["slot_mapping"], md, layer.kv_cache_dtype, layer._k_scale)
        layer.forward_impl(static["query"], static["new_latent"], static["new_rope"], kv_cache,
                           md, output)

    with set_current_vllm_config(model.vllm_config):
        md = model.builder.build_for_cudagraph_capture(metadata_of(capture))
        step(md)  # warm-up outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(md)
        scale = 1.0 if fp8 is None else 0.3
        model.layer._k_scale.fill_(scale)
        for seed, kv_lens in enumerate([[q_len + 100, 3000, 17 + q_len, 900, 1 + q_len],
                                        [2048] * reqs, [q_len] * 6]):
            live = len(kv_lens)
            batch = Batch([q_len] * live, kv_lens, block_size=block_size, device=device,
                          seed=10 + seed, num_blocks=2000, pad_reqs=reqs - live,
                          pad_tokens=(reqs - live) * q_len, fp8_format=fp8, fp8_scale=scale)
            batch.write_history(kv_cache)  # into the cache the graph captured
            static["block_table"].zero_()
            static["block_table"][:, :batch.block_table.shape[1]] = batch.block_table
            for name in ("query", "new_latent", "new_rope", "slot_mapping"):
                static[name].copy_(getattr(batch, name))
            output.fill_(float("nan"))
            model.builder.build(0, metadata_of(batch))
            graph.replay()
            torch.cuda.synchronize()
            _check(model, batch, output)
