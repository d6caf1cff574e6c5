"""The float reference against naive per-request, per-head, per-query loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_backend import reference
from attn_backend.paged_kv import PagedKVCache, slots_from_block_table, slots_from_req_to_token

from .helpers import LAYOUTS, PagedProblem, allocate_pages, make_cache


def naive_attention(q, q_lens, kv_lens, keys, values, *, sm_scale, causal, window_left, soft_cap,
                    masks):
    """Loops over requests, heads and queries; keys/values are per-request [L, Hkv, D] lists."""
    num_qo_heads = q.shape[1]
    out = torch.zeros(q.shape[0], num_qo_heads, values[0].shape[-1] if values else 1,
                      dtype=torch.float64)
    lse = torch.full((q.shape[0], num_qo_heads), float("-inf"), dtype=torch.float64)
    row = 0
    for r, (n, length) in enumerate(zip(q_lens, kv_lens)):
        k, v = keys[r].double(), values[r].double()
        group = num_qo_heads // k.shape[1]
        for i in range(n):
            pos = length - n + i
            for h in range(num_qo_heads):
                scores, seen = [], []
                for j in range(length):
                    if masks is not None:
                        visible = bool(masks[r][i, j])
                    else:
                        visible = (j <= pos) if causal else True
                    if window_left >= 0 and j < pos - window_left:
                        visible = False
                    if not visible:
                        continue
                    s = float(q[row + i, h].double() @ k[j, h // group]) * sm_scale
                    if soft_cap > 0:
                        s = soft_cap * math.tanh(s / soft_cap)
                    scores.append(s)
                    seen.append(j)
                if not scores:
                    continue
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                lse[row + i, h] = top + math.log(total)
                for w, j in zip(weights, seen):
                    out[row + i, h] += (w / total) * v[j, h // group]
        row += n
    return out, lse


problem_settings = st.fixed_dictionaries({
    "page_size": st.sampled_from([1, 16, 64]),
    "num_kv_heads": st.sampled_from([1, 2]),
    "group": st.sampled_from([1, 2, 4]),
    "head_dims": st.sampled_from([(8, 8), (16, 8), (8, 12)]),
    # (prefix, extend) per request: empty prefixes, extends of 0 and 1 included.
    "requests": st.lists(st.tuples(st.integers(0, 80), st.integers(0, 5)), min_size=1, max_size=4),
    "causal": st.booleans(),
    "window_left": st.sampled_from([-1, 0, 3, 20]),
    "soft_cap": st.sampled_from([0.0, 5.0]),
    "use_mask": st.booleans(),
    "layout": st.sampled_from(LAYOUTS),
    "seed": st.integers(0, 2**31 - 1),
})


@settings(max_examples=60, deadline=None)
@given(problem_settings)
def test_reference_matches_naive_loops(p):
    gen = torch.Generator().manual_seed(p["seed"])
    q_lens = [extend for _, extend in p["requests"]]
    kv_lens = [prefix + extend for prefix, extend in p["requests"]]
    dk, dv = p["head_dims"]
    tables, num_pages = allocate_pages(kv_lens, p["page_size"], gen)
    cache = make_cache(p["layout"], num_pages, p["page_size"], p["num_kv_heads"], dk, dv,
                       torch.float64, "cpu", gen)
    problem = PagedProblem(cache, tables, kv_lens, q_lens)
    num_qo_heads = p["num_kv_heads"] * p["group"]
    q = torch.randn(sum(q_lens), num_qo_heads, dk, generator=gen, dtype=torch.float64)
    masks = None
    flat_mask = None
    if p["use_mask"]:
        masks = [torch.rand(n, length, generator=gen) < 0.6 for n, length in zip(q_lens, kv_lens)]
        flat_mask = torch.cat([m.flatten() for m in masks])
    sm_scale = 1 / math.sqrt(dk)
    kv_indptr, kv_slots = problem.kv_csr()
    got = reference.attention(q, problem.qo_indptr(), cache, kv_indptr, kv_slots,
                              sm_scale=sm_scale, causal=p["causal"],
                              window_left=p["window_left"], logits_soft_cap=p["soft_cap"],
                              custom_mask=flat_mask, compute_dtype=torch.float64)
    keys, values = zip(*(cache.gather(problem.slots(r)) for r in range(len(kv_lens))))
    want_out, want_lse = naive_attention(q, q_lens, kv_lens, keys, values, sm_scale=sm_scale,
                                         causal=p["causal"], window_left=p["window_left"],
                                         soft_cap=p["soft_cap"], masks=masks)
    torch.testing.assert_close(got.out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.lse, want_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_layouts_hold_the_same_attention(page_size, seed):
    """The same logical KV in SGLang's buffers and both vLLM layouts gives one result."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens, q_lens = [37, 130, 5], [3, 1, 5]
    tables, num_pages = allocate_pages(kv_lens, page_size, gen)
    base = make_cache("sglang", num_pages, page_size, 2, 16, 8, torch.float32, "cpu", gen)
    q = torch.randn(sum(q_lens), 4, 16, generator=gen)
    results = []
    for layout in LAYOUTS:
        cache = make_cache(layout, num_pages, page_size, 2, 16, 8, torch.float32, "cpu", gen)
        cache.k.copy_(base.k)
        cache.v.copy_(base.v)
        problem = PagedProblem(cache, tables, kv_lens, q_lens)
        kv_indptr, kv_slots = problem.kv_csr()
        results.append(reference.attention(q, problem.qo_indptr(), cache, kv_indptr, kv_slots))
    for other in results[1:]:
        torch.testing.assert_close(other.out, results[0].out, rtol=0, atol=0)
        torch.testing.assert_close(other.lse, results[0].lse, rtol=0, atol=0)


def test_window_and_softcap_semantics_on_a_small_case():
    """Spelled out: window_left=w sees [p - w, p]; soft-cap bends the scaled score."""
    cache = PagedKVCache.from_sglang(torch.eye(4).view(4, 1, 4), torch.arange(4.0).view(4, 1, 1), 1)
    q = torch.full((1, 1, 4), 2.0)  # every key scores 2 * sm_scale = 1
    out = reference.attention(q, [0, 1], cache, [0, 4], torch.arange(4), sm_scale=0.5,
                              window_left=1)
    # The query sits at position 3 and sees keys 2 and 3 with equal scores.
    assert out.out.item() == pytest.approx(2.5)
    assert out.lse.item() == pytest.approx(1 + math.log(2))
    capped = reference.attention(q, [0, 1], cache, [0, 4], torch.arange(4), sm_scale=0.5,
                                 window_left=0, logits_soft_cap=0.5)
    assert capped.lse.item() == pytest.approx(0.5 * math.tanh(2.0))
    assert reference.window_left_from_vllm(4096) == 4095
    assert reference.window_left_from_vllm(None) == -1


def test_row_that_sees_nothing_is_the_merge_identity():
    cache = PagedKVCache.from_sglang(torch.randn(8, 1, 4), torch.randn(8, 1, 4), 4)
    mask = torch.tensor([[False, False], [True, False]]).flatten()
    got = reference.attention(torch.randn(2, 1, 4), [0, 2], cache, [0, 2], torch.tensor([5, 2]),
                              custom_mask=mask)
    assert torch.all(got.out[0] == 0) and got.lse[0].item() == float("-inf")
    assert torch.isfinite(got.lse[1]).all()


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_merging_partial_states_equals_attention_over_the_union(num_splits, seed):
    gen = torch.Generator().manual_seed(seed)
    length, n = 97, 4
    cache = make_cache("sglang", length, 1, 2, 16, 16, torch.float64, "cpu", gen)
    q = torch.randn(n, 8, 16, generator=gen, dtype=torch.float64)
    slots = torch.randperm(length, generator=gen)
    full = reference.attention(q, [0, n], cache, [0, length], slots, causal=False,
                               compute_dtype=torch.float64)
    bounds = sorted(torch.randint(0, length, (num_splits - 1,), generator=gen).tolist())
    pieces = [slots[a:b] for a, b in zip([0] + bounds, bounds + [length])]  # may be empty
    partial = [reference.attention(q, [0, n], cache, [0, len(s)], s, causal=False,
                                   compute_dtype=torch.float64) for s in pieces]
    merged = partial[0]
    for state in partial[1:]:
        merged = reference.merge_states(merged.out, merged.lse, state.out, state.lse)
    torch.testing.assert_close(merged.out, full.out)
    torch.testing.assert_close(merged.lse, full.lse)
    stacked = reference.merge_state_list(torch.stack([s.out for s in partial]),
                                         torch.stack([s.lse for s in partial]))
    torch.testing.assert_close(stacked.out, full.out)
    torch.testing.assert_close(stacked.lse, full.lse)


def test_mla_absorbed_form(seed):
    gen = torch.Generator().manual_seed(seed)
    rank, rope, heads, page_size, length = 32, 8, 4, 16, 45
    buffer = torch.randn(4 * page_size, 1, rank + rope, generator=gen, dtype=torch.float64)
    cache = PagedKVCache.from_mla(buffer, rank, page_size)
    slots = torch.randperm(4 * page_size, generator=gen)[:length]
    q_nope = torch.randn(2, heads, rank, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(2, heads, rope, generator=gen, dtype=torch.float64)
    got = reference.mla_attention(q_nope, q_pe, [0, 2], cache, [0, length], slots, sm_scale=0.1,
                                  compute_dtype=torch.float64)
    rows = buffer[slots, 0]
    c_kv, k_pe = rows[:, :rank], rows[:, rank:]
    scores = (torch.einsum("thr,lr->thl", q_nope, c_kv) + torch.einsum("thr,lr->thl", q_pe, k_pe))
    scores = scores * 0.1
    positions = torch.arange(length)
    causal = positions[None, :] <= torch.tensor([length - 2, length - 1])[:, None]
    scores = scores.masked_fill(~causal[:, None, :], float("-inf"))
    want = torch.einsum("thl,lr->thr", torch.softmax(scores, -1), c_kv)
    torch.testing.assert_close(got.out, want)
    torch.testing.assert_close(got.lse, torch.logsumexp(scores, -1))


def test_long_request_is_chunked_without_changing_the_result(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache("sglang", 300, 1, 1, 8, 8, torch.float64, "cpu", gen)
    q = torch.randn(50, 2, 8, generator=gen, dtype=torch.float64)
    args = (q, [0, 50], cache, [0, 300], torch.arange(300))
    whole = reference.attention(*args, compute_dtype=torch.float64)
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMENTS", 2 * 300 * 7)  # 7 rows per chunk
    chunked = reference.attention(*args, compute_dtype=torch.float64)
    torch.testing.assert_close(chunked.out, whole.out, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_write_kv_reference_and_slot_helpers(layout, page_size, seed):
    gen = torch.Generator().manual_seed(seed)
    num_pages = 10
    cache = make_cache(layout, num_pages, page_size, 2, 16, 8, torch.float32, "cpu", gen)
    before = (cache.k.clone(), cache.v.clone())
    slots = torch.randperm(num_pages * page_size, generator=gen)[:7]
    slots[2] = -1
    key = torch.randn(7, 2, 16, generator=gen)
    value = torch.randn(7, 2, 8, generator=gen)
    reference.write_kv(cache, slots, key, value)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        page, offset = divmod(slot, page_size)
        assert torch.equal(cache.k[page, offset], key[t])
        assert torch.equal(cache.v[page, offset], value[t])
    untouched = torch.ones(num_pages, page_size, dtype=torch.bool)
    for slot in slots[slots >= 0].tolist():
        untouched[divmod(slot, page_size)] = False
    assert torch.equal(cache.k[untouched], before[0][untouched])
    assert torch.equal(cache.v[untouched], before[1][untouched])


def test_slots_from_engine_tables_agree():
    page_size, kv_lens = 4, torch.tensor([6, 0, 9])
    block_table = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 5, 4]])
    indptr, slots = slots_from_block_table(block_table, kv_lens, page_size)
    assert indptr.tolist() == [0, 6, 6, 15]
    assert slots.tolist() == [12, 13, 14, 15, 4, 5, 8, 9, 10, 11, 20, 21, 22, 23, 16]
    req_to_token = torch.zeros(5, 12, dtype=torch.int32)
    req_to_token[4, :6] = slots[:6].int()
    req_to_token[1, :9] = slots[6:].int()
    indptr2, slots2 = slots_from_req_to_token(req_to_token, torch.tensor([4, 0, 1]), kv_lens)
    assert torch.equal(indptr2, indptr) and torch.equal(slots2, slots)
