"""The paged prefill / append kernel against the float reference, on the GPU."""

from __future__ import annotations

import pytest
import torch

from attn_backend import PagedPrefill, PageTable, reference
from attn_backend.kernel_configs import find

from .helpers import (PagedProblem, allocate_pages, behind_slot_map, build_paged_problem,
                      check_against_reference, check_reads_of_prior_kernel_writes, make_cache)

pytestmark = pytest.mark.gpu



build = build_paged_problem


def make_prefill(problem, q, *, num_kv_heads, **kwargs):
    return PagedPrefill(num_qo_heads=q.shape[1], num_kv_heads=num_kv_heads, head_dim=q.shape[2],
                        dtype=q.dtype, device="cuda", max_batch_size=len(problem.kv_lens),
                        max_num_tokens=max(1, q.shape[0]), **kwargs)


def check(prefill, problem, page_table, q, *, causal=True, window_left=-1, soft_cap=0.0,
          custom_mask=None, mask_indptr=None, seed=None):
    check_against_reference(prefill, problem, page_table, q, seed=seed, soft_cap=soft_cap,
                            causal=causal, window_left=window_left, custom_mask=custom_mask,
                            mask_indptr=mask_indptr)


def planned(q_lens, kv_lens, *, seed, page_size=16, num_kv_heads=2, group=4, head_dim=128,
            dtype=torch.bfloat16, layout="vllm_nhd", causal=True, window_left=-1,
            custom_mask=None, mask_indptr=None, backend="auto"):
    gen = torch.Generator().manual_seed(seed)
    engine = "sglang" if layout == "sglang" else "vllm"
    problem, table, q = build(q_lens, kv_lens, page_size=page_size, num_kv_heads=num_kv_heads,
                              group=group, head_dim=head_dim, dtype=dtype, layout=layout,
                              gen=gen, engine=engine)
    prefill = make_prefill(problem, q, num_kv_heads=num_kv_heads, backend=backend)
    prefill.plan([0] + torch.tensor(q_lens).cumsum(0).tolist(), kv_lens, causal=causal,
                 window_left=window_left, custom_mask=custom_mask, mask_indptr=mask_indptr)
    return problem, table, q, prefill


@pytest.fixture(params=["wgmma", "mma"])
def long_tiles(request):
    """Runs a test with each backend for long queries: wgmma (sm_90 GPUs) and mma.sync."""
    if request.param == "wgmma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel runs on sm_90 GPUs")
    return request.param


def needs_backend(backend: str, head_dim: int) -> None:
    if find(f"prefill_{backend}", head_dim, head_dim) is None:
        pytest.skip(f"no prefill_{backend} kernel for head dim {head_dim}")


def short_config_name(head_dim: int, rows_per_request: int) -> str:
    """The short-query configuration a batch of requests of at most `rows_per_request` packed
    rows (<= 64) takes: the key-split one up to 16 rows where it is compiled (d128), else the
    64-row prefill tile."""
    keysplit = find("prefill_short_keysplit", head_dim, head_dim)
    return "prefill_short_keysplit" if keysplit and rows_per_request <= keysplit.tile_rows \
        else "prefill_short"


# Prefills (q = kv), extends on prefixes, single-token rows and partial tiles.
MIXED = ([1, 5, 17, 200, 1, 64, 333], [1, 300, 17, 2049, 1000, 70, 333])
# At most 4 queries per request (<= 64 rows up to group 16): the short shapes (at d128 the
# key-split one up to 16 rows).
SHORT = ([1, 4, 3, 2], [900, 40, 3000, 7])


@pytest.mark.parametrize("layout", ["sglang", "vllm_nhd", "vllm_hnd"])
@pytest.mark.parametrize("page_size", [1, 16, 64, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_page_sizes_layouts_dtypes(layout, page_size, dtype, seed):
    problem, table, q, prefill = planned(*MIXED, seed=seed, page_size=page_size, dtype=dtype,
                                         layout=layout)
    check(prefill, problem, table, q, seed=seed)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window_left", [-1, 100])
def test_prefill_through_a_slot_map(page_size, window_left, long_tiles, seed):
    """SGLang's hybrid pools: the table's slots reach the cache through slot_map."""
    problem, table, q, prefill = planned(*MIXED, seed=seed, page_size=page_size, layout="sglang",
                                         window_left=window_left, backend=long_tiles)
    mapped = behind_slot_map(table, torch.Generator().manual_seed(seed))
    check(prefill, problem, mapped, q, window_left=window_left, seed=seed)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [MIXED, SHORT], ids=["mixed", "short"])
def test_prefill_head_dims_groups_causality(head_dim, group, causal, lengths, long_tiles,
                                            seed):
    needs_backend(long_tiles, head_dim)
    num_kv_heads = max(1, 16 // group)
    problem, table, q, prefill = planned(*lengths, seed=seed, num_kv_heads=num_kv_heads,
                                         group=group, head_dim=head_dim, causal=causal,
                                         backend=long_tiles)
    assert prefill.tile_rows == find(f"prefill_{long_tiles}", head_dim, head_dim).tile_rows
    want = short_config_name(head_dim, max(lengths[0]) * group) if lengths is SHORT \
        else f"prefill_{long_tiles}"
    assert prefill._planned.config.name == want
    check(prefill, problem, table, q, causal=causal, seed=seed)


@pytest.mark.parametrize("group", [1, 4, 8, 16])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("mask", ["causal", "chain", "tree", "window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_requests_of_up_to_16_rows_take_the_key_split_tiles_at_d128(group, page_size, mask,
                                                                    dtype, seed):
    """Speculative verify and draft extends at d128: a batch whose requests have at most 16
    packed rows (1..16 / group tokens) runs on the key-split kernel, with causal placement, tree
    masks or a window, on contexts that split."""
    gen = torch.Generator().manual_seed(seed)
    most = 16 // group
    q_lens = [1, min(2, most), max(1, most // 2), most, max(1, most - 1), most, 1]
    kv_lens = [n + int(torch.randint(0, 3000, (1,), generator=gen)) for n in q_lens]
    kv_lens[2], kv_lens[-1] = 20000, q_lens[-1]  # one long enough to split, one all new
    custom_mask = None
    if mask in ("chain", "tree"):
        custom_mask = torch.cat([tree_mask(n, length, gen, chain=mask == "chain")
                                 for n, length in zip(q_lens, kv_lens)]).cuda()
    window_left = 700 if mask == "window" else -1
    problem, table, q, prefill = planned(q_lens, kv_lens, seed=seed, page_size=page_size,
                                         num_kv_heads=32 // group, group=group, dtype=dtype,
                                         layout="sglang", window_left=window_left,
                                         custom_mask=custom_mask)
    assert prefill._planned.config.name == "prefill_short_keysplit"
    assert prefill._planned.tile_rows == 16
    check(prefill, problem, table, q, window_left=window_left, custom_mask=custom_mask,
          soft_cap=30.0 if mask == "window" else 0.0, seed=seed)


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(32, 1), (64, 1), (128, 1), (64, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [MIXED, SHORT], ids=["mixed", "short"])
def test_prefill_large_gqa_groups(num_qo_heads, num_kv_heads, dtype, lengths, long_tiles, seed):
    """MQA-like groups (32..128 query heads per kv head): rows pack (token, head) pairs, so a
    tile of 192 rows holds one or two tokens of a 128-head group."""
    problem, table, q, prefill = planned(*lengths, seed=seed, num_kv_heads=num_kv_heads,
                                         group=num_qo_heads // num_kv_heads, dtype=dtype,
                                         backend=long_tiles, window_left=150)
    check(prefill, problem, table, q, window_left=150, soft_cap=30.0, seed=seed)


@pytest.mark.parametrize("q_lens, kv_lens", [([8192], [8192]), ([1], [32768]), ([16], [32768]),
                                             ([2048], [32768]), ([7, 3000, 1], [30000, 9000, 2])],
                         ids=["prefill8k", "extend1_on_32k", "extend16_on_32k",
                              "extend2k_on_32k", "mixed_long"])
@pytest.mark.parametrize("window_left, soft_cap", [(-1, 0.0), (-1, 30.0), (4095, 0.0), (100, 50.0)])
def test_prefill_long_contexts_split_kv_window_softcap(q_lens, kv_lens, window_left, soft_cap,
                                                       long_tiles, seed):
    problem, table, q, prefill = planned(q_lens, kv_lens, seed=seed, num_kv_heads=8, group=4,
                                         layout="sglang", window_left=window_left,
                                         backend=long_tiles)
    check(prefill, problem, table, q, window_left=window_left, soft_cap=soft_cap, seed=seed)


@pytest.mark.parametrize("batch", [1, 64, 512])
def test_prefill_batch_sizes(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    q_lens = torch.randint(1, 9, (batch,), generator=gen)
    kv_lens = (q_lens + torch.randint(0, {1: 9000, 64: 2000, 512: 400}[batch], (batch,),
                                      generator=gen)).tolist()
    problem, table, q, prefill = planned(q_lens.tolist(), kv_lens, seed=seed, num_kv_heads=8)
    check(prefill, problem, table, q, seed=seed)


def tree_mask(q_len: int, kv_len: int, gen: torch.Generator, chain: bool) -> torch.Tensor:
    """SGLang's verify mask of one request: the prefix is visible, the drafts see their ancestors."""
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    prefix = kv_len - q_len
    mask[:, :prefix] = True
    for i in range(q_len):
        parent = i - 1 if chain else (int(torch.randint(0, i, (1,), generator=gen)) if i else -1)
        mask[i, prefix + i] = True
        if parent >= 0:
            mask[i, prefix:] |= mask[parent, prefix:]
    return mask.flatten()


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("chain", [True, False], ids=["chain", "tree"])
@pytest.mark.parametrize("window_left", [-1, 200])
def test_prefill_speculative_tree_masks(page_size, chain, window_left, seed):
    gen = torch.Generator().manual_seed(seed)
    q_lens = [1, 4, 8, 16, 5]
    kv_lens = [n + int(torch.randint(0, 5000, (1,), generator=gen)) for n in q_lens]
    mask = torch.cat([tree_mask(n, length, gen, chain) for n, length in zip(q_lens, kv_lens)])
    problem, table, q, prefill = planned(q_lens, kv_lens, seed=seed, page_size=page_size,
                                         num_kv_heads=8, layout="sglang",
                                         window_left=window_left, custom_mask=mask.cuda())
    check(prefill, problem, table, q, window_left=window_left, custom_mask=mask.cuda(),
          seed=seed)


def test_prefill_random_mask_with_gapped_indptr(long_tiles, seed):
    """Any mask bits, blocks placed at offsets with gaps; rows that see nothing give 0 and -inf."""
    gen = torch.Generator().manual_seed(seed)
    q_lens, kv_lens = [3, 40, 1], [50, 700, 9]
    offsets, blocks = [0], []
    for n, length in zip(q_lens, kv_lens):
        gap = int(torch.randint(0, 13, (1,), generator=gen))
        blocks.append(torch.rand(n * length + gap, generator=gen) < 0.3)
        offsets.append(offsets[-1] + n * length + gap)
    mask = torch.cat(blocks)
    mask[offsets[0]:offsets[0] + kv_lens[0]] = False  # request 0's first query sees nothing
    problem, table, q, prefill = planned(q_lens, kv_lens, seed=seed, custom_mask=mask,
                                         mask_indptr=offsets, backend=long_tiles)
    check(prefill, problem, table, q, custom_mask=mask, mask_indptr=offsets, seed=seed)
    out, lse = prefill.run(q, problem.cache, table, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@pytest.mark.parametrize("shape", ["verify", "long"])
def test_prefill_reads_what_the_kernel_before_it_wrote(shape, seed):
    """Programmatic dependent launch: the query, K, V, page table or custom-mask bits written
    by the kernel right before the prefill (helpers.check_reads_of_prior_kernel_writes); tree
    masks on short queries, and long causal queries (the wgmma kernel on sm_90)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    gen = torch.Generator().manual_seed(seed)
    if shape == "verify":
        q_lens = [8] * 4
        kv_lens = [n + int(torch.randint(0, 5000, (1,), generator=gen)) for n in q_lens]
        mask = torch.cat([tree_mask(n, length, gen, chain=False)
                          for n, length in zip(q_lens, kv_lens)]).cuda()
    else:
        q_lens, kv_lens, mask = [700, 2000], [900, 2000], None
    problem, table, q = build(q_lens, kv_lens, page_size=16, num_kv_heads=8, group=4,
                              head_dim=128, dtype=torch.bfloat16, layout="sglang", gen=gen,
                              engine="sglang")
    with_pdl, without_pdl = (make_prefill(problem, q, num_kv_heads=8, enable_pdl=enable_pdl)
                             for enable_pdl in (True, False))
    qo_indptr = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    for prefill in (with_pdl, without_pdl):
        prefill.plan(qo_indptr, kv_lens, causal=True, custom_mask=mask)
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, problem.qo_indptr(), problem.cache, kv_indptr, kv_slots,
                               causal=True, custom_mask=mask)
    buffers = {"q": q, "k": problem.cache.k, "v": problem.cache.v, "page table": table.table}
    if mask is not None:
        buffers["mask bits"] = with_pdl._mask_bits  # packed by plan(); the other keeps its own
    check_reads_of_prior_kernel_writes(
        lambda prefill: prefill.run(q, problem.cache, table, out=torch.full_like(q, float("nan"))),
        with_pdl, without_pdl, buffers, want, seed)


def test_prefill_graph_replays_with_new_lengths_and_masks(seed):
    """A verify-shaped graph (4 requests x 8 drafts, tree masks) replayed with new lengths."""
    gen = torch.Generator().manual_seed(seed)
    batch, drafts, page_size, max_len = 4, 8, 16, 20000
    num_pages = batch * (max_len // page_size + 1) + 4
    cache = make_cache("sglang", num_pages, page_size, 8, 128, 128, torch.bfloat16, "cuda", gen)
    rows = torch.arange(1, batch + 1)
    req_to_token = torch.zeros(batch + 1, max_len + page_size, dtype=torch.int32, device="cuda")
    table = PageTable.from_req_to_token(req_to_token, rows.cuda())
    prefill = PagedPrefill(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                           device="cuda", max_batch_size=batch, max_num_tokens=batch * drafts,
                           max_mask_elements=batch * drafts * max_len, use_cuda_graph=True)
    q = torch.empty(batch * drafts, 32, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    qo_indptr = [drafts * r for r in range(batch + 1)]

    def refresh(kv_lens):
        pages, _ = allocate_pages(kv_lens, page_size, gen, spare_pages=num_pages - sum(
            (n + page_size - 1) // page_size for n in kv_lens))
        problem = PagedProblem(cache, pages, kv_lens, [drafts] * batch)
        req_to_token.zero_()
        for r in range(batch):
            req_to_token[rows[r], : kv_lens[r]] = problem.slots(r).int().cuda()
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        mask = torch.cat([tree_mask(drafts, n, gen, chain=False) for n in kv_lens]).cuda()
        prefill.plan(qo_indptr, kv_lens, custom_mask=mask)
        return problem, mask

    refresh([100] * batch)
    prefill.run(q, cache, table, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prefill.run(q, cache, table, out=out)
    for kv_lens in ([8, 9, 10, 11], [19000, 8, 300, 4096], [max_len] * batch):
        problem, mask = refresh(kv_lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        kv_indptr, kv_slots = problem.kv_csr()
        want = reference.attention(q, problem.qo_indptr(), cache, kv_indptr, kv_slots,
                                   custom_mask=mask)
        torch.testing.assert_close(out.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                                   msg=lambda m: f"seed={seed} lens={kv_lens}: {m}")


def test_prefill_rejects_bad_gpu_inputs(seed):
    problem, table, q, prefill = planned([3, 5], [40, 50], seed=seed)
    with pytest.raises(TypeError, match="q has dtype float16; accepted: bfloat16"):
        prefill.run(q.half(), problem.cache, table)
    with pytest.raises(ValueError, match="q has size 7 in dimension 0; expected 8"):
        prefill.run(q[:7], problem.cache, table)
    bad = PageTable.from_block_table(table.table.clone())
    bad.table[1, 0] = problem.cache.num_pages + 5
    with pytest.raises(ValueError, match="page ids in page_table holds values"):
        prefill.run(q, problem.cache, bad)
    with pytest.raises(ValueError, match="custom_mask has 10 elements; the lengths need 370"):
        prefill.plan([0, 3, 8], [40, 50], custom_mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"kv_dtype float16 with dtype bfloat16; compiled"):
        PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                     kv_dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="backend='wgmma' needs an sm_90 GPU"):
        PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=256, dtype=torch.bfloat16,
                     device="cuda", backend="wgmma")
    misaligned = torch.empty(q.numel() + 8, dtype=q.dtype, device=q.device)[1:1 + q.numel()]
    misaligned = misaligned.view(q.shape).copy_(q)  # 2 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="q must start 16-byte aligned"):
        prefill.run(misaligned, problem.cache, table)


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_sglang_slots_in_any_order_within_pages(page_size, kernel, seed):
    """req_to_token may place a request's tokens anywhere, even out of order inside a page
    (SGLang's kit tests such layouts): the kernels must read each token's own slot."""
    from attn_backend import PagedDecode

    gen = torch.Generator().manual_seed(seed)
    kv_lens = [1, 37, 300, 1000]
    q_lens = [1, 5, 300, 17] if kernel == "prefill" else [1] * 4
    num_pages = sum(kv_lens) // page_size + 8
    cache = make_cache("sglang", num_pages, page_size, 2, 128, 128, torch.bfloat16, "cuda", gen)
    slots = torch.randperm(num_pages * page_size, generator=gen)[: sum(kv_lens)]
    rows = torch.tensor([3, 0, 2, 5])
    req_to_token = torch.zeros(6, max(kv_lens), dtype=torch.int32)
    kv_indptr = [0] + torch.tensor(kv_lens).cumsum(0).tolist()
    for r, row in enumerate(rows.tolist()):
        req_to_token[row, : kv_lens[r]] = slots[kv_indptr[r]:kv_indptr[r + 1]].int()
    table = PageTable.from_req_to_token(req_to_token.cuda(), rows.cuda())
    q = torch.randn(sum(q_lens), 8, 128, generator=gen).to(torch.bfloat16).cuda()
    if kernel == "prefill":
        wrapper = PagedPrefill(num_qo_heads=8, num_kv_heads=2, head_dim=128,
                               dtype=torch.bfloat16, device="cuda", max_batch_size=4,
                               max_num_tokens=q.shape[0])
        qo_indptr = [0] + torch.tensor(q_lens).cumsum(0).tolist()
        wrapper.plan(qo_indptr, kv_lens)
        got = wrapper.run(q, cache, table, out=torch.full_like(q, float("nan")))
    else:
        wrapper = PagedDecode(num_qo_heads=8, num_kv_heads=2, head_dim=128,
                              dtype=torch.bfloat16, device="cuda", max_batch_size=4)
        qo_indptr = list(range(5))
        wrapper.plan(kv_lens)
        got = wrapper.run(q, cache, table, out=torch.full_like(q, float("nan")))
    want = reference.attention(q, qo_indptr, cache, torch.tensor(kv_indptr).cuda(),
                               slots.cuda())
    torch.testing.assert_close(got.float(), want.out, atol=1.5e-2, rtol=1.5e-2,
                               msg=lambda m: f"seed={seed}: {m}")
