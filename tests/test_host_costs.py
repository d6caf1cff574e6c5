"""Host-side costs of planning (pytest-benchmark; CPU only): the C++ planner plan() runs, the
whole plan() of each wrapper, what SGLang's graph replays and vLLM's per-step build() cost on
the host, and that none of those allocates host tensors. The numpy specification is timed too,
for scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_backend import PagedDecode, PagedPrefill
from attn_backend.schedule import TileShape, plan_decode

from .helpers import needs_extension

CTA_SLOTS = 264  # a 132-SM GPU with 2 CTAs per SM


def test_spec_plan_decode_batch_256(benchmark):
    lens = np.random.default_rng().integers(1, 32768, size=256)
    schedule = benchmark(plan_decode, lens, window_left=-1, num_kv_heads=8, group_size=4,
                         shape=TileShape(16, 64), cta_slots=CTA_SLOTS)
    assert schedule.num_items >= 256


@needs_extension
def test_paged_decode_plan_batch_256(benchmark):
    """The whole plan() of a CUDA-graph decode wrapper: validation, the C++ planner, the
    staging buffer's copy into the workspace."""
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         device="cpu", max_batch_size=256, use_cuda_graph=True,
                         cta_slots=CTA_SLOTS)
    lens = np.random.default_rng().integers(1, 4096, size=256)
    benchmark(decode.plan, lens)
    assert decode._planned.num_work_items == 2 * 256 + 4 * (CTA_SLOTS // 8)


@needs_extension
@pytest.mark.parametrize("mask", ["chain", "tree"])
def test_paged_prefill_plan_verify_batch_64(benchmark, mask):
    """plan() of a graph-mode verify wrapper: 64 requests x 4 draft tokens (chains: causal;
    trees: SGLang's flat bool mask, checked and offset on the host; its bit packing runs on the
    device and is not part of this)."""
    batch, drafts = 64, 4
    prefill = PagedPrefill(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                           device="cpu", max_batch_size=batch, max_num_tokens=batch * drafts,
                           max_mask_elements=batch * drafts * 4096, use_cuda_graph=True,
                           cta_slots=CTA_SLOTS)
    kv_lens = np.random.default_rng().integers(drafts, 4096, size=batch)
    qo_indptr = np.arange(batch + 1) * drafts
    custom_mask = torch.ones(int(kv_lens.sum()) * drafts, dtype=torch.bool) \
        if mask == "tree" else None
    benchmark(prefill.plan, qo_indptr, kv_lens, custom_mask=custom_mask)
    assert prefill._planned.config.name == "prefill_short_keysplit"  # 16 rows per request


def _sglang_backend(batch):
    from types import SimpleNamespace

    runner = SimpleNamespace(
        device="cpu", dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, page_size=16,
        use_mla_backend=False, token_to_kv_pool=None,
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(batch + 1, 4096,
                                                                   dtype=torch.int32)),
        model_config=SimpleNamespace(head_dim=128, v_head_dim=128, num_attention_heads=32,
                                     num_key_value_heads=8))
    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    backend = SGLangAttnBackend(runner)
    backend.init_cuda_graph_state(max_bs=batch, max_num_tokens=batch * 4)
    return backend


@needs_extension
def test_sglang_per_replay_host_work_batch_256(benchmark):
    """What SGLang's decode graph replay costs on the host at batch 256: the backend's
    init_forward_metadata_out_graph (metadata and the plan of its one layer shape)."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    batch = 256
    backend = _sglang_backend(batch)
    seq_lens = torch.from_numpy(np.random.default_rng().integers(1, 4096, size=batch))
    replay_view = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens=seq_lens,
                                  seq_lens_cpu=seq_lens,
                                  req_pool_indices=torch.arange(1, batch + 1))
    backend.init_forward_metadata_out_graph(replay_view)  # builds the wrapper
    benchmark(backend.init_forward_metadata_out_graph, replay_view)
    (decoder,) = backend.forward_metadata.wrappers.values()
    config = decoder._planned.config
    want = plan_decode(seq_lens.numpy(), window_left=-1, num_kv_heads=8, group_size=4,
                       shape=TileShape(config.tile_rows, config.kv_tile_tokens),
                       cta_slots=decoder.cta_slots)
    np.testing.assert_array_equal(decoder.planned_schedule().items, want.items)


@needs_extension
def test_sglang_per_replay_host_work_verify_batch_64(benchmark):
    """The same for a speculative-verify graph replay: batch 64, 4-token chains (causal, no
    mask), one graph-sized prefill plan."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    batch, drafts = 64, 4
    backend = _sglang_backend(batch)
    seq_lens = torch.from_numpy(np.random.default_rng().integers(1, 4000, size=batch))
    replay_view = SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, seq_lens=seq_lens, seq_lens_cpu=seq_lens,
        req_pool_indices=torch.arange(1, batch + 1),
        spec_info=SimpleNamespace(draft_token_num=drafts, topk=1, custom_mask=None))
    backend.init_forward_metadata_out_graph(replay_view)  # builds the wrapper
    benchmark(backend.init_forward_metadata_out_graph, replay_view)
    (prefill,) = backend.forward_metadata.wrappers.values()
    assert prefill.use_cuda_graph and prefill._planned.num_tokens == batch * drafts


def _sglang_mla_backend(batch):
    """Our SGLang backend for a DeepSeek-V3-shaped rank (TP 8: 16 heads over latent rows of
    512 + 64), page 1 (SGLang's default for MLA), with graph state for `batch` requests."""
    from types import SimpleNamespace

    class DeepSeekRankConfig(SimpleNamespace):  # what SGLang's ModelConfig answers
        def get_num_attention_heads(self, tp_size):
            return self.num_attention_heads // tp_size

        def get_num_kv_heads(self, tp_size):
            return max(1, self.num_key_value_heads // tp_size)

    runner = SimpleNamespace(
        device="cpu", dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, page_size=1,
        use_mla_backend=True, token_to_kv_pool=SimpleNamespace(), tp_size=8,
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(batch + 1, 4096,
                                                                   dtype=torch.int32)),
        model_config=DeepSeekRankConfig(num_attention_heads=128, num_key_value_heads=128,
                                        head_dim=192, v_head_dim=128, kv_lora_rank=512,
                                        qk_rope_head_dim=64))
    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    backend = SGLangAttnBackend(runner)
    backend.init_cuda_graph_state(max_bs=batch, max_num_tokens=batch * 4)
    return backend


def _replay_view(batch, mode):
    """SGLang's view of a decode or verify (4-token chains) graph replay's static buffers."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seq_lens = torch.from_numpy(np.random.default_rng(0).integers(4, 4000, size=batch))
    view = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens=seq_lens,
                           seq_lens_cpu=seq_lens, req_pool_indices=torch.arange(1, batch + 1))
    if mode == "verify":
        view.forward_mode = ForwardMode.TARGET_VERIFY
        view.spec_info = SimpleNamespace(draft_token_num=4, topk=1, custom_mask=None)
    return view


@needs_extension
def test_sglang_mla_per_replay_host_work_batch_64(benchmark):
    """What SGLang's decode graph replay costs on the host for a DeepSeek-shaped MLA model at
    batch 64 (issue 18's end-to-end shape): the metadata and the latent kernel's plan."""
    pytest.importorskip("sglang")
    batch = 64
    backend = _sglang_mla_backend(batch)
    view = _replay_view(batch, "decode")
    backend.init_forward_metadata_out_graph(view)  # builds the wrapper
    benchmark(backend.init_forward_metadata_out_graph, view)
    (wrapper,) = backend.forward_metadata.wrappers.values()
    assert wrapper.use_cuda_graph and wrapper._planned.num_tokens == batch
    assert (wrapper.head_dim, wrapper.head_dim_vo) == (576, 512)


@needs_extension
def test_sglang_replays_keep_the_page_tables_of_the_static_buffers():
    """A graph replay hands over the same static req_pool_indices every step: its page table
    is built once and kept (it views the buffer, so each step's new rows are read); another
    index tensor (an eager forward) gets a table of its own."""
    pytest.importorskip("sglang")
    backend = _sglang_mla_backend(8)
    view = _replay_view(8, "decode")
    backend.init_forward_metadata_out_graph(view)
    table = backend.forward_metadata.page_table
    assert table.row_index is view.req_pool_indices
    view.req_pool_indices.copy_(torch.arange(8, 0, -1))  # the next step's rows, in place
    view.seq_lens_cpu = view.seq_lens = view.seq_lens + 1
    backend.init_forward_metadata_out_graph(view)
    assert backend.forward_metadata.page_table is table
    assert backend.forward_metadata.kv_lens.tolist() == view.seq_lens.tolist()
    eager = _replay_view(8, "decode")
    backend.init_forward_metadata_out_graph(eager)
    assert backend.forward_metadata.page_table is not table
    assert backend.forward_metadata.page_table.row_index is eager.req_pool_indices
    assert backend.forward_metadata.qo_indptr.tolist() == list(range(9))
    verify = _replay_view(8, "verify")
    backend.init_forward_metadata_out_graph(verify)
    assert backend.forward_metadata.qo_indptr.tolist() == list(range(0, 36, 4))
    assert backend.forward_metadata.kv_lens.tolist() == (verify.seq_lens + 4).tolist()


def _ops_of(fn, calls: int = 5) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return {event.key for event in prof.key_averages()}


# What allocates or copies tensors on the host: none of it belongs in a graph replay's plan.
_ALLOCATING_OPS = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::ones",
                   "aten::full", "aten::pin_memory", "aten::_pin_memory", "aten::copy_",
                   "aten::_to_copy", "aten::clone", "aten::cat", "aten::tensor"}


@needs_extension
@pytest.mark.parametrize("model", ["llama", "deepseek"])
@pytest.mark.parametrize("mode", ["decode", "verify"])
def test_sglang_replay_plans_allocate_nothing(mode, model):
    """The per-replay host work of SGLang's decode and verify graphs (the backend's
    init_forward_metadata_out_graph), for a GQA model and an MLA one, calls the C++ planner
    and views only: no tensor is allocated, pinned or copied per step on the host (a
    pin_memory() per plan once cost the engine's decode steps; the device-side upload, one
    copy per plan, is GPU-tested)."""
    pytest.importorskip("sglang")
    batch = 64
    backend = _sglang_backend(batch) if model == "llama" else _sglang_mla_backend(batch)
    view = _replay_view(batch, mode)
    backend.init_forward_metadata_out_graph(view)  # builds the wrappers
    ops = _ops_of(lambda: backend.init_forward_metadata_out_graph(view))
    assert any("plan_" in op for op in ops), ops  # the planner ran
    assert not ops & _ALLOCATING_OPS, sorted(ops & _ALLOCATING_OPS)


def _vllm_decode_step(tmp_path, batch: int):
    """Our vLLM builder for a Llama-3-8B-shaped group, and a decode step's metadata."""
    pytest.importorskip("vllm")
    from transformers import LlamaConfig
    from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from attn_backend.integrations.vllm.backend import AttnBackendAsCustom

    LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                num_hidden_layers=1, intermediate_size=256, vocab_size=512,
                max_position_embeddings=8192, torch_dtype="bfloat16").save_pretrained(tmp_path)
    model = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=8192)
    config = VllmConfig(model_config=model, cache_config=CacheConfig(block_size=16),
                        scheduler_config=SchedulerConfig(max_num_seqs=batch,
                                                         max_num_batched_tokens=8192,
                                                         max_model_len=8192,
                                                         is_encoder_decoder=False),
                        device_config=DeviceConfig(device="cpu"), parallel_config=ParallelConfig())
    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    builder = AttnBackendAsCustom.get_builder_cls()(spec, ["layer"], config, torch.device("cpu"))
    lens = torch.from_numpy(np.random.default_rng(0).integers(1, 4096, size=batch)).int()
    starts = torch.arange(batch + 1, dtype=torch.int32)
    metadata = CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=lens, num_reqs=batch,
        num_actual_tokens=batch, max_query_len=1, max_seq_len=int(lens.max()),
        block_table_tensor=torch.zeros(batch, 256, dtype=torch.int32),
        slot_mapping=torch.zeros(batch, dtype=torch.int64), causal=True,
        seq_lens_cpu_upper_bound=lens.clone())
    return builder, metadata


@needs_extension
def test_vllm_per_step_build_decode_batch_256(benchmark, tmp_path):
    """What vLLM's step costs our backend on the host at batch 256 (decode, also what a FULL
    graph replay runs): the builder's build(), the decode plan included."""
    builder, metadata = _vllm_decode_step(tmp_path, 256)
    built = benchmark(builder.build, 0, metadata)
    assert built.num_decodes == 256


@needs_extension
def test_vllm_per_step_build_allocates_nothing(tmp_path):
    builder, metadata = _vllm_decode_step(tmp_path, 64)
    builder.build(0, metadata)
    ops = _ops_of(lambda: builder.build(0, metadata))
    assert "attn_backend::plan_decode" in ops, ops
    assert not ops & _ALLOCATING_OPS, sorted(ops & _ALLOCATING_OPS)
