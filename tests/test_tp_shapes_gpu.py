"""Each tensor-parallel rank's share of a model's heads through the kernels, on one GPU
(issue 23): Llama-3-70B's 64 query / 8 kv heads at TP 1, 2, 4 and 8, and Llama-3-8B's 32 / 8 at
TP 2 and 8 (kv heads replicated once TP exceeds them), in decode, prefill and verify shapes,
against the float reference. DeepSeek's 128 MLA heads at TP 8 (16 per rank) are in
tests/test_mla_gpu.py's head counts."""

from __future__ import annotations

import pytest
import torch

from attn_backend import PagedDecode, PagedPrefill

from .helpers import build_paged_problem, check_against_reference

pytestmark = pytest.mark.gpu

# (model, tp) -> (query heads, kv heads) per rank, as both engines divide them
RANK_SHAPES = {("llama70b", 1): (64, 8), ("llama70b", 2): (32, 4), ("llama70b", 4): (16, 2),
               ("llama70b", 8): (8, 1), ("llama8b", 2): (16, 4), ("llama8b", 8): (4, 1)}


@pytest.mark.parametrize("model, tp", list(RANK_SHAPES))
@pytest.mark.parametrize("phase", ["decode", "prefill", "verify"])
def test_rank_share_of_heads(model, tp, phase, seed):
    heads, kv_heads = RANK_SHAPES[(model, tp)]
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [1 + q for q in (0, 3, 200)] + torch.randint(10, 5000, (5,), generator=gen).tolist()
    q_lens = {"decode": [1] * len(kv_lens), "verify": [min(4, n) for n in kv_lens],
              "prefill": [min(n, 300) for n in kv_lens]}[phase]
    problem, table, q = build_paged_problem(q_lens, kv_lens, page_size=16,
                                            num_kv_heads=kv_heads, group=heads // kv_heads,
                                            head_dim=128, dtype=torch.bfloat16,
                                            layout="vllm_nhd", gen=gen)
    if phase == "decode":
        wrapper = PagedDecode(num_qo_heads=heads, num_kv_heads=kv_heads, head_dim=128,
                              dtype=torch.bfloat16, device="cuda", max_batch_size=len(kv_lens))
        wrapper.plan(kv_lens)
        check_against_reference(wrapper, problem, table, q, seed=seed)
        return
    wrapper = PagedPrefill(num_qo_heads=heads, num_kv_heads=kv_heads, head_dim=128,
                           dtype=torch.bfloat16, device="cuda", max_batch_size=len(kv_lens),
                           max_num_tokens=sum(q_lens))
    wrapper.plan(problem.qo_indptr("cpu"), kv_lens, causal=True)
    check_against_reference(wrapper, problem, table, q, seed=seed, causal=True)
