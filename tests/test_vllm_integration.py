"""vLLM V1 integration with vLLM's own config, spec and metadata classes.

Every case builds a batch the way vLLM's runner hands it over (CommonAttentionMetadata
over a K||V-packed per-layer cache with randomly permuted blocks, block 0 left as the
null block), writes the new tokens through `do_kv_cache_update`, runs `forward`,
and compares with a dense float attention written here from the definition. On
CPU the backend runs the float reference; on a GPU the kernels (and CUDA graphs).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
vllm = pytest.importorskip("vllm", reason="vllm is not installed")

from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,  # noqa: E402
                         SchedulerConfig, SpeculativeConfig, VllmConfig)
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionType,  # noqa: E402
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from attn_backend.integrations import vllm as integration  # noqa: E402
from attn_backend.integrations.vllm.backend import (AttnBackend,  # noqa: E402
                                                    AttnBackendAsCustom)

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 8, 2, 128
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _devices():
    return [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaConfig(hidden_size=NUM_HEADS * HEAD_SIZE, num_attention_heads=NUM_HEADS,
                num_key_value_heads=NUM_KV_HEADS, head_dim=HEAD_SIZE, num_hidden_layers=2,
                intermediate_size=256, vocab_size=512, max_position_embeddings=8192,
                torch_dtype="bfloat16").save_pretrained(path)
    return str(path)


def _vllm_config(model_dir, device, num_speculative_tokens=0) -> VllmConfig:
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=8192)
    parallel = ParallelConfig()
    speculative = None
    if num_speculative_tokens:
        speculative = SpeculativeConfig(method="ngram", num_speculative_tokens=num_speculative_tokens,
                                        prompt_lookup_max=4, prompt_lookup_min=2,
                                        target_model_config=model, target_parallel_config=parallel)
    return VllmConfig(model_config=model, cache_config=CacheConfig(block_size=16),
                      scheduler_config=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192,
                                                       max_model_len=8192,
                                                       is_encoder_decoder=False),
                      device_config=DeviceConfig(device=device), parallel_config=parallel,
                      speculative_config=speculative)


@pytest.fixture(scope="module")
def configs(model_dir):
    cache = {}

    def get(device, num_speculative_tokens=0):
        key = (device, num_speculative_tokens)
        if key not in cache:
            cache[key] = _vllm_config(model_dir, device, num_speculative_tokens)
        return cache[key]

    return get


# ---- a vLLM-shaped batch -------------------------------------------------------------------

class Batch:
    """Random K/V histories in a permuted paged cache, and the step's new tokens."""

    def __init__(self, q_lens, kv_lens, *, block_size, device, layout="NHD", seed=0,
                 dtype=torch.bfloat16, num_blocks=None, pad_reqs=0, pad_tokens=0):
        gen = torch.Generator().manual_seed(seed)
        self.q_lens, self.kv_lens = list(q_lens), list(kv_lens)
        self.block_size, self.device, self.dtype = block_size, device, dtype
        blocks_per_req = [-(-n // block_size) for n in kv_lens]
        needed = sum(blocks_per_req) + 1
        num_blocks = max(num_blocks or 0, needed + 3)
        # Block 0 is vLLM's null block; requests get shuffled blocks from 1 on.
        order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        width = max(blocks_per_req) + 2
        reqs = len(q_lens) + pad_reqs
        self.block_table = torch.zeros(reqs, width, dtype=torch.int32)
        cursor = 0
        for r, n in enumerate(blocks_per_req):
            self.block_table[r, :n] = torch.tensor(order[cursor:cursor + n], dtype=torch.int32)
            cursor += n
        # The per-layer cache [num_blocks, H, block_size, 2D]: HND is head-major (LBHNC),
        # NHD token-major (vLLM's default LBNHC) seen through a permuted view.
        if layout == "HND":
            raw = torch.randn(num_blocks, NUM_KV_HEADS, block_size, 2 * HEAD_SIZE, generator=gen)
            self.kv_cache = raw.to(dtype)
        else:
            raw = torch.randn(num_blocks, block_size, NUM_KV_HEADS, 2 * HEAD_SIZE, generator=gen)
            self.kv_cache = raw.to(dtype).permute(0, 2, 1, 3)
        self.keys = [torch.randn(n, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
                     for n in kv_lens]
        self.values = [torch.randn(n, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
                       for n in kv_lens]
        _write_history(self, self.kv_cache)  # all but the new tokens are already cached
        num_tokens = sum(q_lens)
        self.num_tokens = num_tokens + pad_tokens
        self.query = torch.randn(self.num_tokens, NUM_HEADS, HEAD_SIZE, generator=gen).to(dtype)
        slots = []
        for r, (q, n) in enumerate(zip(q_lens, kv_lens)):
            for t in range(n - q, n):
                slots.append(int(self.block_table[r, t // block_size]) * block_size
                             + t % block_size)
        self.slot_mapping = torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int64)
        pad_kv = torch.randn(pad_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
        self.new_keys = torch.cat([k[n - q:] for k, q, n in zip(self.keys, q_lens, kv_lens)]
                                  + [pad_kv])
        self.new_values = torch.cat([v[n - q:] for v, q, n in zip(self.values, q_lens, kv_lens)]
                                    + [pad_kv])
        starts = [0]
        for q in list(q_lens) + [0] * pad_reqs:
            starts.append(starts[-1] + q)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32)
        self.seq_lens = torch.tensor(list(kv_lens) + [0] * pad_reqs, dtype=torch.int32)
        for name in ("block_table", "kv_cache", "query", "slot_mapping", "new_keys",
                     "new_values"):
            setattr(self, name, getattr(self, name).to(device))

    def metadata(self, *, with_upper_bound=True) -> CommonAttentionMetadata:
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc.to(self.device),
            query_start_loc_cpu=self.query_start_loc,
            seq_lens=self.seq_lens.to(self.device), num_reqs=len(self.seq_lens),
            num_actual_tokens=self.num_tokens, max_query_len=max(self.q_lens),
            max_seq_len=max(self.kv_lens), block_table_tensor=self.block_table,
            slot_mapping=self.slot_mapping, causal=True,
            seq_lens_cpu_upper_bound=self.seq_lens.clone() if with_upper_bound else None)

    def expected(self, *, scale, window=None, soft_cap=None, causal=True) -> torch.Tensor:
        """Dense float attention of each request's queries over its whole K/V."""
        outs = []
        group = NUM_HEADS // NUM_KV_HEADS
        start = 0
        for r, (q_len, kv_len) in enumerate(zip(self.q_lens, self.kv_lens)):
            q = self.query[start:start + q_len].float().cpu()
            start += q_len
            k = self.keys[r].float().repeat_interleave(group, dim=1)
            v = self.values[r].float().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale
            if soft_cap:
                scores = soft_cap * torch.tanh(scores / soft_cap)
            pos = torch.arange(kv_len - q_len, kv_len)[:, None]
            key = torch.arange(kv_len)[None, :]
            visible = key <= pos if causal else torch.ones_like(key <= pos)
            if window is not None:
                visible &= key > pos - window
            scores = scores.masked_fill(~visible, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        return torch.cat(outs)


def _make(configs, device, spec, *, num_speculative_tokens=0, window=None, soft_cap=None,
          impl_kwargs=None):
    vllm_config = configs(device, num_speculative_tokens)
    builder = AttnBackendAsCustom.get_builder_cls()(spec, ["model.layers.0.self_attn.attn"],
                                                    vllm_config, torch.device(device))
    impl = AttnBackendAsCustom.get_impl_cls()(NUM_HEADS, HEAD_SIZE, 1 / math.sqrt(HEAD_SIZE),
                                              NUM_KV_HEADS, None, window, "auto", soft_cap,
                                              AttentionType.DECODER, None, **(impl_kwargs or {}))
    return builder, impl


def _run_step(builder, impl, batch: Batch, metadata=None):
    md = builder.build(0, metadata or batch.metadata())
    impl.do_kv_cache_update(None, batch.new_keys, batch.new_values, batch.kv_cache,
                            batch.slot_mapping)
    output = torch.full((batch.num_tokens, NUM_HEADS * HEAD_SIZE), float("nan"),
                        dtype=batch.dtype, device=batch.device)  # poisoned
    impl.forward(None, batch.query, batch.new_keys, batch.new_values, batch.kv_cache, md,
                 output=output)
    return md, output


def _check(output, batch: Batch, **expected_kwargs):
    real = sum(batch.q_lens)
    got = output[:real].view(real, NUM_HEADS, HEAD_SIZE).float().cpu()
    want = batch.expected(scale=1 / math.sqrt(HEAD_SIZE), **expected_kwargs)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def _spec(block_size, window=None):
    if window is not None:
        return SlidingWindowSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS,
                                 head_size=HEAD_SIZE, dtype=torch.bfloat16, sliding_window=window)
    return FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS,
                             head_size=HEAD_SIZE, dtype=torch.bfloat16)


# ---- registration and capabilities ----------------------------------------------------------

def test_register_selects_the_backend_by_both_names():
    integration.register()
    integration.register()  # idempotent: every vLLM process calls it
    assert AttentionBackendEnum.CUSTOM.get_class() is AttnBackendAsCustom
    assert AttentionBackendEnum["ATTN_BACKEND"].get_class() is AttnBackend
    # vLLM looks the layer's backend up by get_name(): it must name the member.
    assert AttentionBackendEnum[AttnBackendAsCustom.get_name()] is AttentionBackendEnum.CUSTOM
    from vllm.config.attention import AttentionConfig

    assert AttentionConfig.validate_backend_before("custom") is AttentionBackendEnum.CUSTOM
    assert AttentionConfig.validate_backend_before("attn_backend") is \
        AttentionBackendEnum["ATTN_BACKEND"]


@pytest.mark.parametrize("version", ["0.26.0", "0.31.2", "0.34.0", "0.34.0rc1", "1.0.0", "main"])
def test_register_refuses_a_vllm_outside_the_supported_range(monkeypatch, version):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(RuntimeError, match=re.escape(f"vllm{integration.SUPPORTED_VLLM}")):
        integration.register()


@pytest.mark.parametrize("version", ["0.32.0", "0.33.0", "0.33.1.dev12+g1234abc"])
def test_supported_vllm_releases_pass_the_version_check(version):
    integration.check_vllm_version(version)


def test_supported_range_is_the_one_pyproject_declares():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["vllm"] == \
        [f"vllm{integration.SUPPORTED_VLLM}"]


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    points = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert points.get("attn_backend") == "attn_backend.integrations.vllm:register"


def _validate(**overrides):
    args = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                attn_type=AttentionType.DECODER)
    args.update(overrides)
    return AttnBackend.validate_configuration(**args)


@pytest.mark.parametrize("overrides", [{}, {"head_size": 64}, {"head_size": 256},
                                       {"dtype": torch.float16}, {"block_size": 1},
                                       {"block_size": 7}, {"block_size": 64},
                                       {"has_sliding_window": True},
                                       {"device_capability": DeviceCapability(8, 0)},
                                       {"kv_cache_dtype": "fp8"}, {"kv_cache_dtype": "fp8_e4m3"},
                                       {"kv_cache_dtype": "fp8_e5m2"},
                                       {"kv_cache_dtype": "fp8", "use_per_head_quant_scales": True},
                                       {"use_non_causal": True}])
def test_validate_configuration_accepts_what_the_kernels_serve(overrides):
    assert _validate(**overrides) == []


@pytest.mark.parametrize("overrides, reason", [
    ({"head_size": 96}, "head_size not supported"),
    ({"dtype": torch.float32}, "dtype not supported"),
    ({"kv_cache_dtype": "fp8_ds_mla"}, "kv_cache_dtype not supported"),
    ({"kv_cache_dtype": "int8_per_token_head"}, "kv_cache_dtype not supported"),
    ({"use_mla": True}, "MLA not supported"),
    ({"has_sink": True}, "attention sinks not supported"),
    ({"device_capability": DeviceCapability(7, 5)}, "compute capability not supported"),
    ({"attn_type": AttentionType.ENCODER_ONLY}, "attention type"),
    ({"use_adaptive_verification": True}, "device-cpu query lens mismatch"),
])
def test_validate_configuration_names_what_it_rejects(overrides, reason):
    reasons = _validate(**overrides)
    assert any(reason in r for r in reasons), reasons


def test_cudagraph_support_and_reorder_threshold(configs):
    builder, _ = _make(configs, "cpu", _spec(16), num_speculative_tokens=3)
    assert builder.get_cudagraph_support(builder.vllm_config, builder.kv_cache_spec) == \
        AttentionCGSupport.UNIFORM_BATCH
    assert builder.reorder_batch_threshold == 4  # 1 + k speculative tokens sort as decodes
    builder, _ = _make(configs, "cpu", _spec(16))
    assert builder.reorder_batch_threshold == 1


# ---- correctness ----------------------------------------------------------------------------

BATCHES = {
    "decode": ([1] * 6, [1, 17, 300, 1000, 33, 2048]),
    "prefill": ([700, 33, 1], [700, 33, 1]),
    "mixed": ([1, 1, 1, 5, 300, 64], [90, 4000, 1, 1200, 300, 64]),
    "extend_chunks": ([128, 17], [3000, 17]),
}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("name", list(BATCHES))
def test_batches_against_dense_attention(configs, device, block_size, name):
    q_lens, kv_lens = BATCHES[name]
    builder, impl = _make(configs, device, _spec(block_size))
    batch = Batch(q_lens, kv_lens, block_size=block_size, device=device, seed=block_size)
    md, output = _run_step(builder, impl, batch)
    assert md.num_decodes == next((i for i, q in enumerate(q_lens) if q > 1), len(q_lens))
    _check(output, batch)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kv_cache_layouts(configs, device, layout):
    builder, impl = _make(configs, device, _spec(16))
    batch = Batch([1, 9, 1], [40, 300, 1], block_size=16, device=device, layout=layout)
    _check(_run_step(builder, impl, batch)[1], batch)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("q_lens, kv_lens", [([4] * 5, [4, 30, 700, 64, 1025]),
                                             ([4, 4, 1, 300], [50, 9, 100, 800])])
def test_speculative_verification(configs, device, q_lens, kv_lens):
    builder, impl = _make(configs, device, _spec(16), num_speculative_tokens=3)
    batch = Batch(q_lens, kv_lens, block_size=16, device=device, seed=3)
    # With drafts the host has only an upper bound: the builder reads the device lengths.
    _check(_run_step(builder, impl, batch, batch.metadata(with_upper_bound=False))[1], batch)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("block_size", [16, 64])
def test_sliding_window_and_soft_cap(configs, device, block_size):
    window = 100
    builder, impl = _make(configs, device, _spec(block_size, window), window=window,
                          soft_cap=30.0)
    batch = Batch([1, 1, 250, 7], [1000, 50, 600, 2000], block_size=block_size, device=device)
    _check(_run_step(builder, impl, batch)[1], batch, window=window, soft_cap=30.0)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("q_len", [1, 4])
def test_graph_padding_requests_and_tokens(configs, device, q_len):
    """vLLM pads a captured batch with empty requests (no queries, no keys) and spare tokens
    whose slot is -1: real rows are exact, padding writes nothing into the cache."""
    builder, impl = _make(configs, device, _spec(16), num_speculative_tokens=q_len - 1)
    batch = Batch([q_len] * 3, [20, 333, 64], block_size=16, device=device, pad_reqs=5,
                  pad_tokens=5 * q_len)
    before = batch.kv_cache.clone()
    _check(_run_step(builder, impl, batch)[1], batch)
    written = (batch.kv_cache != before).any(dim=(1, 3))  # [block, offset]
    pages = set(batch.block_table[:3].flatten().tolist()) - {0}
    assert all(int(page) in pages for page in written.nonzero()[:, 0].unique())


@pytest.mark.parametrize("device", _devices())
def test_profiling_run_and_kv_sharing(configs, device):
    builder, impl = _make(configs, device, _spec(16))
    output = torch.full((4, NUM_HEADS * HEAD_SIZE), 7.0, device=device)
    impl.forward(None, output, output, output, torch.empty(0), None, output=output)
    assert torch.count_nonzero(output) == 0  # attn_metadata None: vLLM's memory profiling
    sharing = AttnBackend.get_impl_cls()(NUM_HEADS, HEAD_SIZE, 0.1, NUM_KV_HEADS,
                                         kv_sharing_target_layer_name="model.layers.0.attn")
    batch = Batch([3], [3], block_size=16, device=device)
    before = batch.kv_cache.clone()
    sharing.do_kv_cache_update(None, batch.new_keys, batch.new_values, batch.kv_cache,
                               batch.slot_mapping)
    assert torch.equal(batch.kv_cache, before)


def test_unsupported_settings_raise_with_the_reason(configs):
    with pytest.raises(NotImplementedError, match="sinks"):
        _make(configs, "cpu", _spec(16), impl_kwargs={"sinks": torch.zeros(NUM_HEADS)})
    with pytest.raises(NotImplementedError, match="alibi"):
        AttnBackend.get_impl_cls()(NUM_HEADS, HEAD_SIZE, 0.1, NUM_KV_HEADS, [1.0] * NUM_HEADS)
    with pytest.raises(NotImplementedError, match="attention type"):
        AttnBackend.get_impl_cls()(NUM_HEADS, HEAD_SIZE, 0.1, NUM_KV_HEADS,
                                   attn_type=AttentionType.ENCODER_ONLY)
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_inc'; accepted: .*fp8_e5m2"):
        AttnBackend.get_impl_cls()(NUM_HEADS, HEAD_SIZE, 0.1, NUM_KV_HEADS,
                                   kv_cache_dtype="fp8_inc")
    builder, _ = _make(configs, "cpu", _spec(16))
    batch = Batch([2], [5], block_size=16, device="cpu")
    metadata = batch.metadata()
    metadata.causal = torch.tensor([False])
    with pytest.raises(NotImplementedError, match="per-request causality"):
        builder.build(0, metadata)
    vllm_config = configs("cpu")
    vllm_config.parallel_config.enable_dbo = True
    try:
        with pytest.raises(NotImplementedError, match="micro-batching"):
            AttnBackend.get_builder_cls()(_spec(16), ["x"], vllm_config, torch.device("cpu"))
    finally:
        vllm_config.parallel_config.enable_dbo = False


def test_a_v2_warm_up_the_block_table_cannot_hold_is_refused_at_construction(model_dir,
                                                                             monkeypatch):
    """Seen on the H200: max_model_len 280, 8 sequences, 8192 batched tokens; the V2 runner's
    warm-up gave each dummy request 1024 tokens and run() refused it mid-start-up."""
    from types import SimpleNamespace

    from attn_backend.integrations.vllm.backend import check_dummy_requests_fit

    def config(v2, tokens, seqs, max_model_len):
        return SimpleNamespace(use_v2_model_runner=v2, model_config=SimpleNamespace(
            max_model_len=max_model_len), scheduler_config=SimpleNamespace(
            max_num_batched_tokens=tokens, max_num_seqs=seqs))

    with pytest.raises(ValueError, match=r"requests of 1024 tokens, longer than max_model_len "
                                         r"\(280\).*<= max_num_seqs x max_model_len \(2240\)"):
        check_dummy_requests_fit(config(True, 8192, 8, 280), "attn_backend")
    check_dummy_requests_fit(config(True, 2240, 8, 280), "attn_backend")  # 280 each: fits
    check_dummy_requests_fit(config(False, 8192, 8, 280), "attn_backend")  # V1: within limits
    check_dummy_requests_fit(config(True, 100, 256, 64), "attn_backend")  # fewer tokens than seqs

    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=280)
    vllm_config = VllmConfig(model_config=model, cache_config=CacheConfig(block_size=16),
                             scheduler_config=SchedulerConfig(
                                 max_num_seqs=8, max_num_batched_tokens=8192, max_model_len=280,
                                 is_encoder_decoder=False),
                             device_config=DeviceConfig(device="cpu"))
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        AttnBackend.get_builder_cls()(_spec(16), ["x"], vllm_config, torch.device("cpu"))


# ---- FP8 caches ----------------------------------------------------------------------------

class _ScaledLayer(torch.nn.Module):
    """What the impl reads of vLLM's Attention layer for FP8: its scale buffers."""

    def __init__(self, k_scale, v_scale):
        super().__init__()
        self.register_buffer("_k_scale", k_scale)
        self.register_buffer("_v_scale", v_scale)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
@pytest.mark.parametrize("name", ["decode", "mixed"])
@pytest.mark.parametrize("storage", ["uint8", "float8"])
def test_fp8_cache(configs, device, cache_dtype, per_head, name, storage, monkeypatch):
    """vLLM's uint8 cache (or, as vLLM's own backend tests hand it over, a float8 tensor under
    a 16-bit spec), read as the dtype string's format: the history stored with vLLM's
    quantisation rule, the step's tokens written by do_kv_cache_update, the answer the
    reference's over the dequantised cache; the scales are read from the layer at each call
    (a replaced buffer is seen)."""
    from attn_backend import PagedKVCache, fp8, reference
    from attn_backend.paged_kv import slots_from_block_table

    q_lens, kv_lens = BATCHES[name]
    block_size = 16
    vllm_config = configs(device)
    monkeypatch.setattr(vllm_config.cache_config, "cache_dtype", cache_dtype)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS,
                             head_size=HEAD_SIZE,
                             dtype=torch.uint8 if storage == "uint8" else torch.bfloat16)
    builder = AttnBackendAsCustom.get_builder_cls()(spec, ["model.layers.0.self_attn.attn"],
                                                    vllm_config, torch.device(device))
    impl = AttnBackendAsCustom.get_impl_cls()(NUM_HEADS, HEAD_SIZE, 1 / math.sqrt(HEAD_SIZE),
                                              NUM_KV_HEADS, None, None, cache_dtype)
    batch = Batch(q_lens, kv_lens, block_size=block_size, device=device, seed=3)
    format_ = fp8.fp8_dtype(cache_dtype)
    shape = (NUM_KV_HEADS,) if per_head else ()
    k_scale = torch.full(shape, 0.02, device=device) + (torch.arange(NUM_KV_HEADS, device=device)
                                                        * 0.01 if per_head else 0)
    v_scale = torch.full(shape, 0.015, device=device)
    layer = _ScaledLayer(torch.full(shape, 1.0, device=device), v_scale)
    layer._k_scale = k_scale  # replaced after construction, as compressed-tensors does
    heads = lambda s: s.reshape(-1).expand(NUM_KV_HEADS)[None, :, None, None]  # noqa: E731
    scales = torch.cat([heads(k_scale).expand(-1, -1, -1, HEAD_SIZE),
                        heads(v_scale).expand(-1, -1, -1, HEAD_SIZE)], dim=-1)
    largest = torch.finfo(format_).max
    stored = (batch.kv_cache.float() / scales).clamp(-largest, largest).to(format_)
    kv_cache = stored.view(torch.uint8) if storage == "uint8" else stored  # vLLM's storage
    md = builder.build(0, batch.metadata())
    impl.do_kv_cache_update(layer, batch.new_keys, batch.new_values, kv_cache, batch.slot_mapping)
    output = torch.full((batch.num_tokens, NUM_HEADS * HEAD_SIZE), float("nan"),
                        dtype=batch.dtype, device=device)
    impl.forward(layer, batch.query, batch.new_keys, batch.new_values, kv_cache, md,
                 output=output)
    cache = PagedKVCache.from_vllm(kv_cache.view(format_), HEAD_SIZE, k_scale=k_scale,
                                   v_scale=v_scale)
    kv_indptr, kv_slots = slots_from_block_table(batch.block_table, torch.tensor(kv_lens),
                                                 block_size)
    want = reference.attention(batch.query[: sum(q_lens)], [0] + torch.tensor(
        q_lens).cumsum(0).tolist(), cache, kv_indptr, kv_slots, sm_scale=1 / math.sqrt(HEAD_SIZE))
    real = sum(q_lens)
    torch.testing.assert_close(output[:real].view(real, NUM_HEADS, HEAD_SIZE).float().cpu(),
                               want.out.cpu(), atol=2e-2, rtol=2e-2)
    # The new tokens' bytes are vLLM's rule: x / scale in float32, nearest even, saturated.
    keys = cache.gather(batch.slot_mapping[batch.slot_mapping >= 0])[0]
    want_keys = fp8.quantize(batch.new_keys[: keys.shape[0]], cache.scales_per_head()[0], format_)
    assert torch.equal(keys.view(torch.uint8), want_keys.view(torch.uint8))


@pytest.mark.parametrize("device", _devices())
def test_non_causal_blocks_see_all_of_their_keys(configs, device):
    """Bidirectional decoder blocks (causal=False: DFlash's drafts): every query of a block
    sees all of its request's keys, its own block's included; one-token rows are unchanged."""
    q_lens, kv_lens = [1, 1, 5, 16, 3], [90, 4000, 300, 16, 1200]
    builder, impl = _make(configs, device, _spec(16))
    batch = Batch(q_lens, kv_lens, block_size=16, device=device, seed=21)
    metadata = batch.metadata()
    metadata.causal = False
    md, output = _run_step(builder, impl, batch, metadata)
    assert not md.causal and md.num_decodes == 2
    real = sum(q_lens)
    got = output[:real].view(real, NUM_HEADS, HEAD_SIZE).float().cpu()
    want = batch.expected(scale=1 / math.sqrt(HEAD_SIZE), causal=False)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    causal_want = batch.expected(scale=1 / math.sqrt(HEAD_SIZE))
    assert not torch.allclose(got[2:], causal_want[2:], atol=2e-2, rtol=2e-2)


def test_kv_element_type_follows_the_layers_cache_string():
    """FP8 strings name the format whatever the spec's storage type; a 16-bit spec under "auto"
    (a layer --kv-cache-dtype-skip-layers keeps unquantised) stays 16-bit; uint8 bytes without
    an FP8 string are refused."""
    from attn_backend.integrations.vllm.backend import kv_dtype_of

    assert kv_dtype_of(torch.uint8, "fp8") == torch.float8_e4m3fn
    assert kv_dtype_of(torch.bfloat16, "fp8_e5m2") == torch.float8_e5m2
    assert kv_dtype_of(torch.bfloat16, "auto") == torch.bfloat16
    with pytest.raises(ValueError, match="uint8 KV cache with kv_cache_dtype 'auto'"):
        kv_dtype_of(torch.uint8, "auto")


# ---- CUDA graphs ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("q_len", [1, 4])
def test_cuda_graph_capture_and_replay(configs, q_len):
    """Capture a uniform batch once (K/V write + attention), then replay it with other
    lengths, block tables and padding, as vLLM's FULL decode graphs do."""
    device, reqs, block_size = "cuda", 8, 16
    builder, impl = _make(configs, device, _spec(block_size), num_speculative_tokens=q_len - 1)
    capture = Batch([q_len] * reqs, [q_len + 40] * reqs, block_size=block_size, device=device,
                    num_blocks=4000)
    static = {name: getattr(capture, name).clone() for name in
              ("query", "new_keys", "new_values", "slot_mapping", "block_table")}
    static["block_table"] = torch.zeros(reqs, 200, dtype=torch.int32, device=device)
    static["block_table"][:, :capture.block_table.shape[1]] = capture.block_table
    kv_cache = capture.kv_cache
    output = torch.empty(reqs * q_len, NUM_HEADS * HEAD_SIZE, dtype=torch.bfloat16,
                         device=device)

    def metadata_of(batch: Batch):
        md = batch.metadata()
        md.block_table_tensor = static["block_table"]
        md.slot_mapping = static["slot_mapping"]
        return md

    def step(md):
        impl.do_kv_cache_update(None, static["new_keys"], static["new_values"], kv_cache,
                                static["slot_mapping"])
        impl.forward(None, static["query"], static["new_keys"], static["new_values"], kv_cache,
                     md, output=output)

    md = builder.build_for_cudagraph_capture(metadata_of(capture))
    step(md)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(md)

    for seed, kv_lens in enumerate([[q_len + 100, 3000, 17 + q_len, 900, 1 + q_len],
                                    [2048] * reqs, [q_len] * 6]):
        live = len(kv_lens)
        batch = Batch([q_len] * live, kv_lens, block_size=block_size, device=device,
                      seed=10 + seed, num_blocks=4000, pad_reqs=reqs - live,
                      pad_tokens=(reqs - live) * q_len)
        batch.kv_cache = kv_cache  # the cache the graph captured
        _write_history(batch, kv_cache)
        static["block_table"].zero_()
        static["block_table"][:, :batch.block_table.shape[1]] = batch.block_table
        for name in ("query", "new_keys", "new_values", "slot_mapping"):
            static[name].copy_(getattr(batch, name))
        output.fill_(float("nan"))
        builder.build(0, metadata_of(batch))
        graph.replay()
        torch.cuda.synchronize()
        _check(output, batch)


def _write_history(batch: Batch, kv_cache: torch.Tensor) -> None:
    for r, (q, n) in enumerate(zip(batch.q_lens, batch.kv_lens)):
        t = torch.arange(n - q, device=kv_cache.device)
        pages = batch.block_table[r, t // batch.block_size].long().to(kv_cache.device)
        offsets = t % batch.block_size
        kv_cache[pages, :, offsets, :HEAD_SIZE] = batch.keys[r][: n - q].to(kv_cache.device)
        kv_cache[pages, :, offsets, HEAD_SIZE:] = batch.values[r][: n - q].to(kv_cache.device)
