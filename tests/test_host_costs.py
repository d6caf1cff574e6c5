"""Host-side cost of planning a decode batch (pytest-benchmark; CPU only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_backend import PagedDecode
from attn_backend.schedule import plan_decode

from .helpers import native_decode_planner


def test_plan_decode_schedule_batch_256(benchmark):
    lens = np.random.default_rng().integers(1, 32768, size=256)
    schedule = benchmark(plan_decode, lens, window_left=-1, num_kv_heads=8, cta_slots=264)
    assert schedule.num_items >= 256


def test_paged_decode_plan_batch_256_split(benchmark):
    """The whole plan() of a CUDA-graph decode wrapper: schedule, padding and buffer refresh."""
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         device="cpu", max_batch_size=256, use_cuda_graph=True,
                         cta_slots=264)  # as on a 132-SM GPU with 2 CTAs per SM
    lens = np.random.default_rng().integers(1, 4096, size=256)
    benchmark(decode.plan, lens)
    assert decode._planned.num_work_items == 2 * 256 + 4 * (264 // 8)


@pytest.mark.parametrize("planner", ["numpy", "native"])
def test_sglang_per_replay_host_work_batch_256(benchmark, planner):
    """What SGLang's decode graph replay costs on the host at batch 256: the backend's
    init_forward_metadata_out_graph (metadata + one decoder's plan), with the numpy planner
    (the CPU path) or the C++ one (the GPU path)."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    batch, page_size = 256, 16
    req_to_token = torch.zeros(batch + 1, 4096, dtype=torch.int32)
    runner = SimpleNamespace(
        device="cpu", dtype=torch.bfloat16, page_size=page_size, use_mla_backend=False,
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=None, model_config=SimpleNamespace())
    backend = SGLangAttnBackend(runner)
    key = (32, 8, 128, 128, torch.bfloat16, -1)
    decode = PagedDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         device="cpu", max_batch_size=batch, use_cuda_graph=True, cta_slots=396)
    if planner == "native":
        decode._native_planner = native_decode_planner()  # as on a CUDA device
    backend._decoders[key] = decode
    seq_lens = torch.from_numpy(np.random.default_rng().integers(1, 4096, size=batch))
    replay_view = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens=seq_lens,
                                  seq_lens_cpu=seq_lens,
                                  req_pool_indices=torch.arange(1, batch + 1))
    benchmark(backend.init_forward_metadata_out_graph, replay_view)
    assert key in backend.forward_metadata.planned
    want = plan_decode(seq_lens.numpy(), window_left=-1, num_kv_heads=8, cta_slots=396)
    assert np.array_equal(decode._host_schedule[:, :want.num_items], want.items)


def test_sglang_per_replay_host_work_verify_batch_64(benchmark):
    """The same for a speculative-verify graph replay: batch 64, 4-token chains (causal, no
    mask), the backend's init_forward_metadata_out_graph with one graph-sized prefill plan."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attn_backend import PagedPrefill
    from attn_backend.integrations.sglang.backend import SGLangAttnBackend

    batch, drafts = 64, 4
    req_to_token = torch.zeros(batch + 1, 4096, dtype=torch.int32)
    runner = SimpleNamespace(
        device="cpu", dtype=torch.bfloat16, page_size=16, use_mla_backend=False,
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=None, model_config=SimpleNamespace())
    backend = SGLangAttnBackend(runner)
    key = (32, 8, 128, 128, torch.bfloat16, -1, True, True)
    backend._prefills[key] = PagedPrefill(num_qo_heads=32, num_kv_heads=8, head_dim=128,
                                          dtype=torch.bfloat16, device="cpu",
                                          max_batch_size=batch, max_num_tokens=batch * drafts,
                                          use_cuda_graph=True, cta_slots=264)
    seq_lens = torch.from_numpy(np.random.default_rng().integers(1, 4000, size=batch))
    replay_view = SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, seq_lens=seq_lens, seq_lens_cpu=seq_lens,
        req_pool_indices=torch.arange(1, batch + 1),
        spec_info=SimpleNamespace(draft_token_num=drafts, topk=1, custom_mask=None))
    benchmark(backend.init_forward_metadata_out_graph, replay_view)
    assert key in backend.forward_metadata.planned


def test_native_decode_planner_batch_256(benchmark):
    """The C++ planner that PagedDecode.plan() runs on the GPU path (same schedule as above)."""
    from attn_backend.schedule import graph_grid_size, max_items_per_head

    planner = native_decode_planner()
    lens = torch.from_numpy(np.random.default_rng().integers(1, 32768, size=256))
    capacity = max_items_per_head(256, 8, 264)
    schedule = torch.empty(4, capacity, dtype=torch.int32)
    merge_indptr = torch.empty(257, dtype=torch.int32)
    num_items, _ = benchmark(planner, lens, -1, 8, 264, capacity, graph_grid_size(256, 8, 264),
                             schedule, merge_indptr)
    assert num_items >= 256
