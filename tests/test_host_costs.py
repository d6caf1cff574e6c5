"""Host-side cost of planning a decode batch (pytest-benchmark; CPU only)."""

from __future__ import annotations

import numpy as np
import torch

from attn_backend import PagedDecode
from attn_backend.schedule import plan_decode


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
